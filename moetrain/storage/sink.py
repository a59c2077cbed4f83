"""Streaming one object out: ``HashingSink`` checksums and counts the bytes on their
way to the store's output stream, and ``LocalFileSync`` makes a local file durable while it is
written (see "Durability of local directories" in ``moetrain.storage.store``): each chunk's
write-back is started as soon as it is written (Linux ``sync_file_range``), and the file is
fsync-ed before its size and checksum are reported."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import sys
import threading
from typing import Callable

import pyarrow.fs as pafs

from moetrain.storage.checksum import DEFAULT, new_hasher

CHUNK_BYTES = 8 << 20  # hashing and writing interleave in chunks of this size


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # a ctypes call releases the GIL while it runs


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start write-back of the range's dirty pages; do not wait
WRITEBACK_MIN_BYTES = 1 << 20  # start write-back once this much was written since the last start


class LocalFileSync:
    """Makes one local file durable while it is written (see "Durability" in the module doc).

    ``written(n)`` after each chunk starts the disk write of the bytes written since the last
    start once they reach ``WRITEBACK_MIN_BYTES`` (best-effort, Linux only: small writes such as
    headers and alignment padding are grouped with what follows, one call instead of one per
    write); ``finish()`` fsyncs the file (the guarantee, whatever was started) and closes its
    descriptor. A read-only descriptor is enough: write-back and fsync act on the file."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = 0
        self._started = 0  # bytes below this offset have had their write-back started

    def written(self, nbytes: int) -> None:
        self._offset += nbytes
        pending = self._offset - self._started
        if _sync_file_range is not None and pending >= WRITEBACK_MIN_BYTES:
            _sync_file_range(self._fd, self._started, pending, _SYNC_FILE_RANGE_WRITE)
            self._started = self._offset

    def finish(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fsync_dir(path: str) -> None:
    """fsync a directory, so the names of the files created in it are on disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PIPELINE_BYTES = 1 << 20  # slices at least this big are hashed beside their write
_HASHER: cf.ThreadPoolExecutor | None = None
_HASHER_LOCK = threading.Lock()


def _hasher() -> cf.ThreadPoolExecutor:
    """The process's checksum helper threads (created on first use; threads start on demand)."""
    global _HASHER
    with _HASHER_LOCK:
        if _HASHER is None:
            _HASHER = cf.ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="ckpt-hash")
        return _HASHER


class HashingSink:
    """A write-only file object that checksums and counts what passes through to ``out``.

    Large buffers are split into ``CHUNK_BYTES`` slices. sha256 (~1.7 GB/s per core): each
    slice is hashed on a helper thread while it is written (slices under ``PIPELINE_BYTES``
    inline). crc32c (~12 GB/s, GIL released): inline, just before the slice's write; measured
    locally (7 interleaved runs, 1 and 4 streams, cores shared with other jobs) it is as fast
    as hashing beside the write and costs less CPU (0.52-0.69 vs 0.54-0.80 s per GB written
    durably), which is what a loaded 2-core host runs out of. Measured on moto: 8, 32 or
    64 MB slices upload at the same speed. ``on_written(n)`` is called after each slice
    reached ``out`` (local stores: start its write-back to disk). ``checksum``: the
    algorithm (``checksum.ALGORITHMS``).
    """

    PIPELINED = frozenset({"sha256"})  # checksums hashed on a helper thread beside the write

    def __init__(
        self, out: pafs.NativeFile, on_written: Callable[[int], None] | None = None, checksum: str = DEFAULT
    ) -> None:
        self._out = out
        self._on_written = on_written
        self._hash = new_hasher(checksum)
        self.checksum = checksum
        self._pipelined = checksum in self.PIPELINED
        self.size = 0
        self.io_error: BaseException | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, CHUNK_BYTES):
            piece = view[start : start + CHUNK_BYTES]
            # sha256, large slices: hash on a helper thread while this one writes (both
            # release the GIL), so a single stream costs max(hash, write) instead of their
            # sum. Updates stay in order: each is finished before the next slice starts.
            hashed = (
                _hasher().submit(self._hash.update, piece)
                if self._pipelined and piece.nbytes >= PIPELINE_BYTES
                else None
            )
            try:
                if hashed is None:
                    self._hash.update(piece)
                self._out.write(piece)
                if self._on_written is not None:
                    self._on_written(piece.nbytes)
            except OSError as exc:
                self.io_error = exc
                raise
            finally:
                if hashed is not None:
                    hashed.result()  # never return while the hash still reads the caller's buffer
        self.size += view.nbytes
        return view.nbytes

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
