"""The commit of a checkpoint: ``manifest.json``, then the run's ``latest`` pointer.

Owns: the :class:`Manifest` (run, step, created, world size, every object's size + checksum
(its algorithm named per object: crc32c by default, sha256 when configured or in manifests
written before crc32c became the default), the
driver's JSON-able ``meta``: config, placement, data cursor, losses ...), ``commit`` (driver
side, after every rank's writer finished) and reading manifests / the ``latest`` pointer.

Order is the protocol: objects (streamed straight to their keys, each rank reporting every
object's size + checksum) -> ``manifest.json`` (atomic: temporary key + move; its presence *is*
the commit) -> ``latest`` (atomic). On local directories every object is fsync-ed by its writer
and the step's directories just before ``manifest.json`` (``Store.sync_dirs``), so the order
also holds on disk after a power loss. A crash at any point leaves either the previous commit or
the new one visible, never a half one. A ``step-N/`` without a manifest is uncommitted garbage
(see ``retention``), partial objects included; objects of a committed step are checked against
the manifest's checksums by every reader, and a committed step is never written again. Call
``retention.apply_retention`` after ``commit`` to keep N checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from moetrain.checkpoint.errors import (
    CheckpointError,
    CorruptObjectError,
    NotCommittedError,
    ObjectNotFoundError,
)
from moetrain.checkpoint.format import MAGIC
from moetrain.checkpoint.layout import (
    MANIFEST,
    CheckpointRef,
    ObjectEntry,
    check_run,
    check_step,
    latest_key,
    parse_step_dir,
    step_prefix,
)
from moetrain.storage.store import Store
from moetrain.checkpoint.writer import SaveResult

if TYPE_CHECKING:
    from moetrain.checkpoint.lease import Lease

FORMAT = "moetrain-checkpoint"
# v2: each entry's checksum key names its algorithm ("crc32c" or "sha256"); v1: always "sha256".
# A v2 manifest is refused by a v1 reader (which would look for "sha256" and fail on crc32c).
VERSION = 2
READ_VERSIONS = (1, 2)
OBJECT_FORMAT = f"MTCKPT/{MAGIC[-1]}"


@dataclass(frozen=True)
class Manifest:
    run: str
    step: int
    world_size: int  # ranks that wrote the checkpoint
    entries: tuple[ObjectEntry, ...]  # sorted by name
    meta: dict[str, Any] = field(default_factory=dict)  # the driver's JSON-able state
    created: str = ""  # ISO-8601 UTC
    object_format: str = OBJECT_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def checksums(self) -> tuple[str, ...]:
        """The checksum algorithms of the entries (sorted, each once)."""
        return tuple(sorted({e.checksum for e in self.entries}))

    def entry(self, name: str) -> ObjectEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise ObjectNotFoundError(f"object {name!r} is not in the manifest of {self.run}/step-{self.step}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "object_format": self.object_format,
                "run": self.run,
                "step": self.step,
                "created": self.created,
                "world_size": self.world_size,
                "total_bytes": self.total_bytes,
                "entries": [e.to_dict() for e in self.entries],
                "meta": self.meta,
            },
            indent=1,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT or data.get("version") not in READ_VERSIONS:
                raise ValueError(
                    f"format {data.get('format')!r} v{data.get('version')!r} "
                    f"is not {FORMAT!r} v{'/v'.join(map(str, READ_VERSIONS))}"
                )
            return cls(
                run=str(data["run"]),
                step=int(data["step"]),
                world_size=int(data["world_size"]),
                entries=tuple(ObjectEntry.from_dict(e) for e in data["entries"]),
                meta=dict(data.get("meta") or {}),
                created=str(data.get("created", "")),
                object_format=str(data.get("object_format", OBJECT_FORMAT)),
            )
        except (ValueError, KeyError, TypeError, AttributeError, CheckpointError) as exc:
            raise CorruptObjectError(f"manifest {where} is unreadable: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Commit
# --------------------------------------------------------------------------------------------


def _entries_of(rank: int, item: SaveResult | Sequence[ObjectEntry | dict]) -> list[ObjectEntry]:
    if isinstance(item, SaveResult):
        if not item.ok:
            raise CheckpointError(f"rank {item.rank} failed to write its objects: {item.error}")
        return list(item.entries)
    return [ObjectEntry.from_dict(e) for e in item]


def _merge(step: int, per_rank: Sequence[Any]) -> tuple[ObjectEntry, ...]:
    """All ranks' entries by name; the same name twice is fine only with the same bytes."""
    merged: dict[str, ObjectEntry] = {}
    for rank, item in enumerate(per_rank):
        for entry in _entries_of(rank, item):
            seen = merged.setdefault(entry.name, entry)
            if seen != entry:
                raise CheckpointError(
                    f"step {step}: object {entry.name!r} was written twice with different bytes "
                    f"(size {seen.size} {seen.checksum} {seen.digest[:12]} vs size {entry.size} "
                    f"{entry.checksum} {entry.digest[:12]}): only one rank may own it"
                )
    return tuple(sorted(merged.values(), key=lambda e: e.name))


def _check_present(store: Store, prefix: str, entries: Sequence[ObjectEntry]) -> None:
    """One listing: every entry exists with its recorded size (no commit of a lost object)."""
    sizes = {f.key: f.size for f in store.list_files(prefix)}
    missing = [e.name for e in entries if f"{prefix}/{e.name}" not in sizes]
    if missing:
        raise ObjectNotFoundError(f"cannot commit {store.uri_of(prefix)}: objects missing: {missing}")
    wrong = [e.name for e in entries if sizes[f"{prefix}/{e.name}"] != e.size]
    if wrong:
        raise CorruptObjectError(f"cannot commit {store.uri_of(prefix)}: size differs for {wrong}")


def commit(
    store: Store,
    run: str,
    step: int,
    per_rank: Sequence[SaveResult | Sequence[Any]],
    meta: dict[str, Any] | None = None,
    *,
    lease: "Lease | None" = None,
) -> Manifest:
    """Commit checkpoint ``step`` of ``run``: write ``manifest.json`` then ``latest``.

    ``per_rank``: one item per rank, a :class:`SaveResult` or a list of ``ObjectEntry`` /
    ``{name, size, crc32c | sha256}`` dicts (the key names the checksum algorithm). A failed
    rank, a missing object, non-JSON ``meta``, a ``lease`` this writer no longer holds
    (:class:`~moetrain.checkpoint.lease.LeaseLostError`) or a ``latest`` pointer already at a
    higher committed step (``latest`` never moves backwards) raises :class:`CheckpointError` and
    nothing is committed (``latest`` is unchanged)."""
    check_run(run)
    check_step(step)
    entries = _merge(step, per_rank)
    prefix = step_prefix(run, step)
    _check_present(store, prefix, entries)
    _check_not_backwards(store, run, step)
    if lease is not None:
        lease.verify()
    store.sync_dirs(prefix)  # local stores: the objects' names are on disk before the commit
    manifest = Manifest(
        run=run,
        step=step,
        world_size=len(per_rank),
        entries=entries,
        meta=dict(meta or {}),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    try:
        text = manifest.to_json()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot commit {store.uri_of(prefix)}: meta is not JSON: {exc}") from exc
    store.write_bytes(f"{prefix}/{MANIFEST}", text.encode("utf-8"))
    store.write_bytes(latest_key(run), f"step-{step}\n".encode("ascii"))
    return manifest


def _check_not_backwards(store: Store, run: str, step: int) -> None:
    """Refuse a commit below the step ``latest`` names while that step is committed."""
    try:
        current = read_latest(store, run)
    except CorruptObjectError:
        return  # an unreadable pointer is overwritten by this commit
    if current is not None and current > step and store.exists(f"{step_prefix(run, current)}/{MANIFEST}"):
        raise CheckpointError(
            f"cannot commit {store.uri_of(step_prefix(run, step))}: {store.uri_of(latest_key(run))} already names "
            f"the committed step {current} (latest never moves backwards; is another run writing {run!r}?)"
        )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_manifest(ref: CheckpointRef) -> Manifest:
    """The manifest of ``ref``; :class:`NotCommittedError` if it has none."""
    try:
        text = ref.store.read_bytes(ref.manifest_key)
    except ObjectNotFoundError:
        raise NotCommittedError(f"{ref.uri} has no {MANIFEST}: not a committed checkpoint") from None
    manifest = Manifest.from_json(text, ref.store.uri_of(ref.manifest_key))
    if (manifest.run, manifest.step) != (ref.run, ref.step):
        raise CorruptObjectError(f"manifest of {ref.uri} is for {manifest.run}/step-{manifest.step}")
    return manifest


def read_latest(store: Store, run: str) -> int | None:
    """The step the run's ``latest`` pointer names, or None if there is no pointer."""
    key = latest_key(run)
    try:
        text = store.read_bytes(key).decode("ascii", "replace").strip()
    except ObjectNotFoundError:
        return None
    step = parse_step_dir(text)
    if step is None:
        raise CorruptObjectError(f"{store.uri_of(key)} holds {text[:40]!r}, expected 'step-<N>'")
    return step
