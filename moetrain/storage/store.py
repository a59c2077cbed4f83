"""Object storage: one ``Store`` per root URI, on top of ``pyarrow.fs``, for checkpoints, prepared
data, tokenizers and Hugging Face import / export alike (opened by :mod:`moetrain.storage.open`
from a root URI and a :class:`~moetrain.config.StoreConfig`).

Owns: the few operations its users need, each with retries and typed errors naming the URI:

- ``write_atomic(key, produce)``: stream to a temporary key next to the final one with
  ``open_output_stream`` (no local staging), checksum (``Store.checksum``: crc32c by default,
  or sha256; see ``checksum``) and count bytes while streaming, then
  ``move`` into place. On any exception the stream is closed *before* the temporary object is
  deleted (on S3, closing completes the multipart upload, so a stream left to the garbage
  collector could resurrect a partial object after the delete). The final key therefore only
  ever holds a complete object. Used for the commit records (``manifest.json``, ``latest``),
  whose mere presence is meaningful.
- ``write_direct(key, produce)``: the same streaming and hashing, straight to the final key (no
  temporary, no ``move``: on S3 a move is a server-side copy of the whole object plus a delete,
  25-30% of the upload time on moto). On an exception the stream is closed and the object
  deleted, best-effort. Used for the objects *inside* a checkpoint directory, where a partial
  object is harmless because the manifest is the commit: see "Why direct writes are safe".
- reads (whole objects, into a writable buffer), listing, deletes.

Credentials never go through this module's strings: S3 keys come from the AWS SDK's usual chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, config files), GCS
credentials from Application Default Credentials, and the repr of a ``Store`` and every error
message carry only the (redacted) URI. Tested against moto (S3) and fake-gcs-server (GCS).

Why direct writes are safe for checkpoint objects (PITFALLS):

- an exception inside ``open_output_stream`` (serialiser bug, lost connection) *completes* a
  partial object: pyarrow has no abort for output streams, and closing an S3 stream finishes its
  multipart upload. We delete it right after, but the delete is best-effort (the store may be
  down), so a partial object can be left at the final key;
- that object is never referenced by a manifest: its writer reports the failure, the rank's
  ``SaveResult`` is not ``ok`` and ``manifest.commit`` refuses a failed rank; ``commit`` also
  checks every listed object's size (one listing) before writing ``manifest.json``;
- every reader checks each object's size and checksum against the manifest *before* decoding
  (``reader.load_objects`` / ``verify``), so even bytes that changed after the commit are
  rejected (``CorruptObjectError``), never loaded;
- a committed step is never written again (``AsyncCheckpointWriter`` refuses it), so a
  committed object is never replaced under its manifest; an uncommitted ``step-N/`` is garbage
  that ``retention`` deletes once a newer step is committed;
- the commit records themselves (``manifest.json``, ``latest``) keep ``write_atomic``: their
  presence is the commit, so a partial one must never appear.

Durability of local directories (``fsync=True``, the default): an object counts as written
only once it is on disk. Each object's pages are handed to the disk as they are written
(Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: the device writes chunk *i* while chunk *i+1*
is checksummed) and the file is ``fsync``-ed before its size and checksum are reported;
``sync_dirs`` fsyncs the directories of a step before ``manifest.json`` is written, and
``write_atomic`` fsyncs the directory after its ``move``. Without this, a power loss after the
commit could leave ``manifest.json`` and ``latest`` naming objects whose data never reached the
disk (ext4 and XFS write data back up to ~30 s late). S3 and GCS need none of it: an upload
is durable when it completes.

Pending multipart uploads: a writer killed mid-object (SIGKILL) leaves a pending multipart upload
on S3 (under the object's final key, or a ``*.tmp-*`` key for the commit records). pyarrow does
not expose ListMultipartUploads / AbortMultipartUpload; ``retention.abort_stale_uploads`` uses
boto3 when it is installed.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, TypeVar
from urllib.parse import urlsplit

import numpy as np
import pyarrow.fs as pafs

from moetrain.storage.checksum import DEFAULT, new_hasher
from moetrain.storage.errors import (
    BucketNotFoundError,
    InvalidNameError,
    ObjectNotFoundError,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
)
from moetrain.storage.sink import HashingSink, LocalFileSync, fsync_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

TMP_MARK = ".tmp-"  # temporary keys are "<final key>.tmp-<12 hex>"

# Substrings of pyarrow / AWS SDK / GCS error messages, by meaning.
_ACCESS = (
    "ACCESS_DENIED",
    "ACCESSDENIED",
    "INVALID_ACCESS_KEY_ID",
    "INVALIDACCESSKEYID",
    "SIGNATURE_DOES_NOT_MATCH",
    "SIGNATUREDOESNOTMATCH",
    "EXPIRED_TOKEN",
    "FORBIDDEN",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNRECOGNIZED_CLIENT",
    "HTTP RESPONSE CODE: 403",
)
_NO_BUCKET = ("NO_SUCH_BUCKET", "NOSUCHBUCKET")
_NO_KEY = ("NO_SUCH_KEY", "NOSUCHKEY", "RESOURCE_NOT_FOUND")
_TRANSIENT = (
    "NETWORK_CONNECTION",
    "COULD NOT CONNECT",
    "CURLCODE",
    "TIMED OUT",
    "TIMEOUT",
    "SLOW_DOWN",
    "SLOWDOWN",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "THROTTL",
    "CONNECTION RESET",
    "BROKEN PIPE",
    "UNAVAILABLE",
    "HTTP RESPONSE CODE: 5",
    "REQUEST_TIMEOUT",
    "TEMPORARILY",
)


def classify_os_error(exc: BaseException) -> tuple[type[StoreError], bool]:
    """(error class, transient?) for an exception raised by a pyarrow filesystem call."""
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFoundError, False
    if isinstance(exc, PermissionError):
        return StoreAccessError, False
    text = str(exc).upper()
    if any(s in text for s in _NO_BUCKET):
        return BucketNotFoundError, False
    if any(s in text for s in _ACCESS):
        return StoreAccessError, False
    if any(s in text for s in _NO_KEY):
        return ObjectNotFoundError, False
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(s in text for s in _TRANSIENT):
        return StoreUnreachableError, True
    return StoreError, False


def redact_uri(uri: str) -> str:
    """The URI without user info or query string (where credentials could hide)."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


@dataclass(frozen=True)
class WriteResult:
    key: str  # relative to the store root
    size: int  # bytes written
    checksum: str  # the algorithm: crc32c | sha256
    digest: str  # hex digest of exactly those bytes


@dataclass(frozen=True)
class FileEntry:
    key: str  # relative to the store root
    size: int
    mtime: float  # seconds since the epoch (0.0 where the store does not say)


class _ProducerFailed(Exception):
    """Carries an exception raised by a ``produce`` callback through the retry loop."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


@dataclass(frozen=True)
class Store:
    """A root (checkpoints, prepared data, a model directory) on some filesystem. Keys are
    '/'-separated paths below the root."""

    uri: str  # redacted root URI, e.g. "s3://bucket/prefix" or "/abs/dir"
    fs: pafs.FileSystem = field(repr=False, compare=False)
    root: str = field(repr=False)  # the root as a path inside ``fs``
    kind: str = "local"  # local | s3 | gcs | other
    max_retries: int = 3
    backoff_s: float = 0.5
    endpoint: str = field(default="", repr=False)  # "scheme://host:port" when overridden (S3, GCS)
    s3_region: str = field(default="", repr=False)
    fsync: bool = True  # local stores: objects and directories reach the disk before commit
    checksum: str = DEFAULT  # algorithm of the objects written here: crc32c | sha256

    @property
    def syncs(self) -> bool:
        """Whether writes here are fsync-ed (local stores with ``fsync``)."""
        return self.kind == "local" and self.fsync

    # ---- naming ----------------------------------------------------------------------
    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def uri_of(self, key: str) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def _key_of(self, path: str) -> str:
        return path[len(self.root) :].lstrip("/")

    # ---- error handling --------------------------------------------------------------
    def _run(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` with retries on transient errors; raise a typed error naming the URI."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except OSError as exc:
                cls, transient = classify_os_error(exc)
                if transient and attempt < self.max_retries:
                    delay = self.backoff_s * (2**attempt)
                    log.warning(
                        "%s %s: transient error (%s); retry %d/%d in %.2fs",
                        what,
                        self.uri_of(key),
                        exc,
                        attempt + 1,
                        self.max_retries,
                        delay,
                    )
                    time.sleep(delay)
                    continue
                tries = f" after {attempt + 1} attempts" if transient else ""
                raise cls(f"{what} {self.uri_of(key)} failed{tries}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _make_parent(self, path: str) -> None:
        if self.kind == "local":
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)

    def _delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError as exc:  # already gone, or the store is down: clean() removes leftovers
            log.debug("could not delete the unfinished object %s: %s", path, exc)

    # ---- writes ----------------------------------------------------------------------
    def _stream(self, key: str, produce: Callable[[HashingSink], object], *, atomic: bool) -> WriteResult:
        """Stream ``produce(sink)`` to ``key`` (via a temporary key and ``move`` when ``atomic``),
        with retries; see :meth:`write_atomic` and :meth:`write_direct`."""

        def attempt() -> WriteResult:
            final = self.path(key)
            target = self.path(f"{key}{TMP_MARK}{uuid.uuid4().hex[:12]}") if atomic else final
            self._make_parent(target)
            # compression=None: never gzip an object because its name ends in ".gz"
            out = self.fs.open_output_stream(target, compression=None)
            sync = None
            try:
                sync = LocalFileSync(target) if self.syncs else None
                sink = HashingSink(out, sync.written if sync is not None else None, self.checksum)
                try:
                    produce(sink)
                except BaseException as exc:
                    _close_quietly(out)  # close *before* deleting: see the module doc
                    if exc is sink.io_error or not isinstance(exc, Exception):
                        raise
                    raise _ProducerFailed(exc) from exc
                out.close()
                if sync is not None:
                    sync.finish()
                if atomic:
                    self.fs.move(target, final)
                    if self.syncs:
                        fsync_dir(final.rsplit("/", 1)[0])
            except BaseException:
                _close_quietly(out)
                if sync is not None:
                    sync.close()
                self._delete_quietly(target)
                raise
            return WriteResult(key=key, size=sink.size, checksum=sink.checksum, digest=sink.hexdigest())

        try:
            return self._run("writing", key, attempt)
        except _ProducerFailed as failed:
            raise failed.original from None

    def write_atomic(self, key: str, produce: Callable[[HashingSink], object]) -> WriteResult:
        """Stream ``produce(sink)`` to ``key`` atomically; returns its size and checksum.

        Transient I/O errors restart the object from scratch (``produce`` must be re-callable).
        An exception raised by ``produce`` itself is not retried: it is re-raised unchanged after
        the temporary object is removed. Nothing is ever visible under ``key`` but a whole object.
        """
        return self._stream(key, produce, atomic=True)

    def write_direct(self, key: str, produce: Callable[[HashingSink], object]) -> WriteResult:
        """Stream ``produce(sink)`` straight to ``key``; returns its size and checksum.

        Same retries and error handling as :meth:`write_atomic`, minus the temporary key and the
        ``move``: one request less and no server-side copy on S3. While it runs, and if it fails
        and the best-effort delete fails too, ``key`` may hold a partial object. Only for keys
        whose readers check size + checksum against a record written atomically afterwards (the
        objects of a checkpoint; see "Why direct writes are safe" in the module doc)."""
        return self._stream(key, produce, atomic=False)

    def write_bytes(self, key: str, data: bytes) -> WriteResult:
        return self.write_atomic(key, lambda sink: sink.write(data))

    def sync_dirs(self, prefix: str) -> None:
        """Local stores with ``fsync``: fsync every directory below ``prefix`` and its parents
        up to the root, so the names of the objects written there survive a power loss (call
        before committing them). A no-op elsewhere."""
        if not self.syncs:
            return

        def sync() -> None:
            top = self.path(prefix)
            for dirpath, _, _ in os.walk(top):
                fsync_dir(dirpath)
            parent = top
            while len(parent) > len(self.root) and "/" in parent:
                parent = parent.rsplit("/", 1)[0] or "/"
                fsync_dir(parent)

        self._run("syncing", prefix, sync)

    # ---- reads -----------------------------------------------------------------------
    def read_array(self, key: str) -> np.ndarray:
        """The whole object as a writable uint8 array (one GET on S3)."""

        def read() -> np.ndarray:
            with self.fs.open_input_file(self.path(key)) as f:
                size = f.size()
                buf = np.empty(size, dtype=np.uint8)
                got = f.readinto(buf) if size else 0
            if got != size:
                raise OSError(f"short read: {got} of {size} bytes (timeout)")
            return buf

        return self._run("reading", key, read)

    def read_bytes(self, key: str) -> bytes:
        return self.read_array(key).tobytes()

    def digest(self, key: str, algorithm: str, chunk: int = 8 << 20) -> tuple[int, str]:
        """(size, hex checksum under ``algorithm``) of the object, streamed in ``chunk``-byte
        pieces: memory stays bounded whatever the object's size."""

        def read() -> tuple[int, str]:
            hasher, size = new_hasher(algorithm), 0
            with self.fs.open_input_stream(self.path(key)) as f:
                while piece := f.read(chunk):
                    hasher.update(piece)
                    size += len(piece)
            return size, hasher.hexdigest()

        return self._run("reading", key, read)

    def exists(self, key: str) -> bool:
        info = self._run("checking", key, lambda: self.fs.get_file_info(self.path(key)))
        return info.type == pafs.FileType.File

    def list_files(self, prefix: str = "") -> list[FileEntry]:
        """Every object below ``prefix`` (recursive), sorted by key; [] when there is none."""
        sel = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        infos = self._run("listing", prefix, lambda: self.fs.get_file_info(sel))
        out = [
            FileEntry(self._key_of(i.path), int(i.size or 0), i.mtime.timestamp() if i.mtime is not None else 0.0)
            for i in infos
            if i.type == pafs.FileType.File
        ]
        return sorted(out, key=lambda e: e.key)

    def list_dir(self, prefix: str = "") -> list[str]:
        """Names of the immediate children (objects and 'directories') of ``prefix``.

        Object stores have no directories, only key prefixes, and how a non-recursive listing
        reports them differs (pyarrow's GCS filesystem on a GCS-protocol server lists only the
        objects); there the children are read off a recursive listing of the keys."""
        if self.kind != "local":
            base = f"{prefix}/" if prefix else ""
            return sorted({f.key[len(base) :].split("/", 1)[0] for f in self.list_files(prefix)})
        sel = pafs.FileSelector(self.path(prefix), recursive=False, allow_not_found=True)
        infos = self._run("listing", prefix, lambda: self.fs.get_file_info(sel))
        return sorted(i.base_name for i in infos)

    # ---- deletes ---------------------------------------------------------------------
    def delete(self, key: str) -> None:
        try:
            self._run("deleting", key, lambda: self.fs.delete_file(self.path(key)))
        except ObjectNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        if not prefix:
            raise InvalidNameError(f"refusing to delete the whole store root {self.uri}")
        try:
            self._run("deleting", prefix, lambda: self.fs.delete_dir(self.path(prefix)))
        except ObjectNotFoundError:
            pass


def _close_quietly(out: pafs.NativeFile) -> None:
    try:
        out.close()
    except Exception as exc:  # the stream may already be broken; the object is deleted next
        log.debug("closing a failed output stream: %s", exc)
