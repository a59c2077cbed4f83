"""Finding, verifying and loading checkpoints.

Owns: ``resolve`` (a URI, ``.../<run>``, ``.../<run>/latest``, ``.../<run>/step-<N>`` or the
word ``latest`` -> a :class:`CheckpointRef`), ``verify`` (presence + size + checksum of every
object in the manifest, naming each bad one) and ``load_objects`` (each rank reads only the
objects it hosts, checks their checksum *before* decoding, and gets state dicts back). Each
object is checked with the algorithm its manifest entry names (crc32c, or sha256 as every
manifest before the crc32c default has it).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch

from moetrain.storage.checksum import digest as checksum_digest
from moetrain.checkpoint.errors import (
    CheckpointError,
    CorruptObjectError,
    InvalidNameError,
    NotCommittedError,
    ObjectNotFoundError,
)
from moetrain.checkpoint.format import read_state
from moetrain.checkpoint.layout import LATEST, CheckpointRef, ObjectEntry, check_run, parse_step_dir
from moetrain.checkpoint.manifest import Manifest, read_latest, read_manifest
from moetrain.checkpoint.retention import list_checkpoints
from moetrain.checkpoint.root import open_root
from moetrain.config import CheckpointConfig, StoreConfig
from moetrain.storage.store import Store

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------------------------


def split_uri(uri: str) -> tuple[str, str, int | None]:
    """(root URI, run, step or None) of ``<root>/<run>[/step-<N>|/latest]``. Pure."""
    text = uri.rstrip("/")
    scheme, sep, rest = text.rpartition("://") if "://" in text else ("", "", text)
    segments = rest.split("/")
    step = None
    if segments and segments[-1] == LATEST:
        segments = segments[:-1]
    elif segments and parse_step_dir(segments[-1]) is not None:
        step = parse_step_dir(segments.pop())
    min_root = 1 if scheme else 0  # a bucket must stay in the root of s3:// / gs:// URIs
    if len(segments) < min_root + 1 or not segments[-1]:
        raise InvalidNameError(f"checkpoint URI {uri!r} must look like <root>/<run>[/step-<N>]")
    run = check_run(segments[-1])
    root = "/".join(segments[:-1]) or "/"
    return (f"{scheme}{sep}{root}" if scheme else root), run, step


def _newest(store: Store, run: str) -> int:
    step = read_latest(store, run)
    if step is not None:
        return step
    committed = [i.step for i in list_checkpoints(store, run) if i.committed]
    if not committed:
        raise NotCommittedError(f"no committed checkpoint under {store.uri_of(run)}")
    return max(committed)


def resolve(
    uri_or_latest: str,
    cfg: CheckpointConfig | None = None,
    *,
    run: str | None = None,
    store: Store | None = None,
    store_cfg: StoreConfig | None = None,
) -> CheckpointRef:
    """A :class:`CheckpointRef` for ``uri_or_latest``.

    ``"latest"``: the newest commit of ``run`` under ``cfg.uri`` (or ``store``). A run URI or
    ``.../latest``: its newest commit (the ``latest`` pointer; the highest committed step if the
    pointer is missing). ``.../step-<N>``: that checkpoint (committed or not: see
    :func:`read_manifest`). Relative local paths are made absolute. A store is opened (unless
    ``store`` is given) with ``cfg``'s options and ``store_cfg``'s endpoints."""
    cfg = cfg or CheckpointConfig()
    if uri_or_latest == LATEST:
        if run is None:
            raise InvalidNameError("resolving 'latest' needs the run name (cluster.run_name)")
        if store is None:
            if not cfg.uri:
                raise InvalidNameError("checkpoint.resume is 'latest' but checkpoint.uri is empty")
            store = open_root(cfg.uri, cfg, store_cfg)
        return CheckpointRef(store, check_run(run), _newest(store, run))
    uri = uri_or_latest
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    root, run_name, step = split_uri(uri)
    store = store or open_root(root, cfg, store_cfg)
    return CheckpointRef(store, run_name, step if step is not None else _newest(store, run_name))


# --------------------------------------------------------------------------------------------
# Verifying and loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    uri: str
    step: int
    checked: int = 0  # objects found and checked
    bytes_checked: int = 0
    missing: tuple[str, ...] = ()  # object names absent from the store
    corrupt: tuple[str, ...] = ()  # object names whose size / checksum differ
    problems: tuple[str, ...] = ()  # one readable line per problem (manifest included)
    checksums: tuple[str, ...] = ()  # the algorithms the manifest names (deep checks use them)

    @property
    def ok(self) -> bool:
        return not self.problems


def _map(
    fn: Callable[[ObjectEntry], T], entries: Iterable[ObjectEntry], workers: int
) -> list[tuple[ObjectEntry, T | None, BaseException | None]]:
    """Apply ``fn`` concurrently; (entry, result, error) in input order."""
    entries = list(entries)
    with cf.ThreadPoolExecutor(max(1, min(workers, len(entries) or 1))) as pool:
        futures = [pool.submit(fn, e) for e in entries]
    return [(e, f.result() if f.exception() is None else None, f.exception()) for e, f in zip(entries, futures)]


def _read_checked(ref: CheckpointRef, entry: ObjectEntry):
    """The object's bytes, after checking size and checksum against the manifest."""
    uri = ref.store.uri_of(ref.key(entry.name))
    buf = ref.store.read_array(ref.key(entry.name))
    if buf.nbytes != entry.size:
        raise CorruptObjectError(f"{uri}: size {buf.nbytes} != manifest {entry.size}")
    digest = checksum_digest(entry.checksum, buf)
    if digest != entry.digest:
        raise CorruptObjectError(f"{uri}: {entry.checksum} {digest[:16]} != manifest {entry.digest[:16]}")
    return buf


def _checksum_streamed(ref: CheckpointRef, entry: ObjectEntry) -> int:
    """Size and checksum of one object against the manifest, streamed (bounded memory);
    returns its size."""
    uri = ref.store.uri_of(ref.key(entry.name))
    size, digest = ref.store.digest(ref.key(entry.name), entry.checksum)
    if size != entry.size:
        raise CorruptObjectError(f"{uri}: size {size} != manifest {entry.size}")
    if digest != entry.digest:
        raise CorruptObjectError(f"{uri}: {entry.checksum} {digest[:16]} != manifest {entry.digest[:16]}")
    return size


class NonFiniteValues(ValueError):
    """An object's tensors hold NaN or inf (intact bytes, unusable values)."""


def _nonfinite_paths(node: Any, path: str = "") -> list[str]:
    if isinstance(node, torch.Tensor):
        return [path] if node.is_floating_point() and not bool(torch.isfinite(node).all()) else []
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _nonfinite_paths(v, f"{path}/{k}" if path else str(k))]
    if isinstance(node, (list, tuple)):
        return [p for i, v in enumerate(node) for p in _nonfinite_paths(v, f"{path}/{i}")]
    return []


def _check_finite(ref: CheckpointRef, entry: ObjectEntry) -> int:
    """Checked bytes of one object; raises :class:`NonFiniteValues` naming NaN/inf tensors."""
    buf = _read_checked(ref, entry)
    bad = _nonfinite_paths(read_state(buf, ref.store.uri_of(ref.key(entry.name))))
    if bad:
        raise NonFiniteValues(
            f"NaN or inf in {', '.join(bad[:5])}" + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        )
    return buf.nbytes


def verify(ref: CheckpointRef, *, deep: bool = True, values: bool = True, max_concurrency: int = 4) -> VerifyReport:
    """Check every object of the manifest: present, right size and (``deep``) right checksum and
    (``values``) finite floating values. ``values=False`` streams each object through its
    checksum in bounded memory (what a resume checks on the driver)."""
    try:
        manifest = read_manifest(ref)
    except (NotCommittedError, CorruptObjectError) as exc:
        return VerifyReport(uri=ref.uri, step=ref.step, problems=(str(exc),))
    if deep:
        check = _check_finite if values else _checksum_streamed
        results = _map(lambda e: check(ref, e), manifest.entries, max_concurrency)
    else:
        sizes = {f.key: f.size for f in ref.store.list_files(ref.prefix)}

        def check_size(e: ObjectEntry) -> int:
            size, uri = sizes.get(ref.key(e.name)), ref.store.uri_of(ref.key(e.name))
            if size is None:
                raise ObjectNotFoundError(f"{uri} is missing")
            if size != e.size:
                raise CorruptObjectError(f"{uri}: size {size} != manifest {e.size}")
            return size

        results = _map(check_size, manifest.entries, 1)
    missing = [e.name for e, _, err in results if isinstance(err, ObjectNotFoundError)]
    corrupt = [e.name for e, _, err in results if isinstance(err, CorruptObjectError)]
    nonfinite = [(e.name, err) for e, _, err in results if isinstance(err, NonFiniteValues)]
    others = [
        err
        for _, _, err in results
        if err is not None and not isinstance(err, (ObjectNotFoundError, CorruptObjectError, NonFiniteValues))
    ]
    if others:  # unreachable store, access denied: not a verdict on the checkpoint
        raise others[0]
    problems = (
        [f"missing: {n}" for n in missing]
        + [f"corrupt: {e.name}: {err}" for e, _, err in results if isinstance(err, CorruptObjectError)]
        + [f"non-finite: {n}: {err}" for n, err in nonfinite]
    )
    ok = [(e, size or 0) for e, size, err in results if err is None]
    return VerifyReport(
        uri=ref.uri,
        step=ref.step,
        checked=len(ok),
        bytes_checked=sum(s for _, s in ok),
        missing=tuple(missing),
        corrupt=tuple(corrupt),
        problems=tuple(problems),
        checksums=manifest.checksums,
    )


def load_objects(
    ref: CheckpointRef, names: Iterable[str], *, manifest: Manifest | None = None, max_concurrency: int = 4
) -> dict[str, Any]:
    """Read, checksum and decode the objects ``names`` of ``ref`` -> {name: state dict}.

    Tensors come back on CPU as views of one buffer per object. Every unknown, missing or
    corrupt object is named in the one error raised."""
    manifest = manifest or read_manifest(ref)
    by_name = {e.name: e for e in manifest.entries}
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ObjectNotFoundError(f"{ref.uri}: objects not in the manifest: {unknown}")
    results = _map(
        lambda e: read_state(_read_checked(ref, e), ref.store.uri_of(ref.key(e.name))),
        [by_name[n] for n in names],
        max_concurrency,
    )
    failures = [(e.name, err) for e, _, err in results if err is not None]
    if failures:
        first = failures[0][1]
        text = f"{ref.uri}: {len(failures)} object(s) failed to load: " + "; ".join(
            f"{n}: {err}" for n, err in failures
        )
        cls = type(first) if isinstance(first, CheckpointError) else CheckpointError
        raise cls(text) from first
    return {e.name: state for e, state, _ in results}
