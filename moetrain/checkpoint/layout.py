"""Where things live under a checkpoint root, and the handle of one checkpoint.

Owns the key scheme (nothing else builds keys by hand)::

    <root>/<run>/latest                      text "step-<N>\\n": the newest commit
    <root>/<run>/lease.json                  the writer holding the run name (see ``lease``)
    <root>/<run>/step-<N>/manifest.json      written last: its presence is the commit
    <root>/<run>/step-<N>/<object name>      e.g. dense/rank-0, experts/layer-3/expert-17
                                             (written in place: only the manifest vouches for it)
    <root>/<run>/step-<N>/<name>.tmp-<hex>   a commit record being written (never read)

Object names are '/'-separated segments of ``[A-Za-z0-9._=-]``; ``manifest.json`` and names
containing ``.tmp-`` are reserved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moetrain.storage.checksum import ALGORITHMS
from moetrain.checkpoint.errors import CheckpointError, InvalidNameError
from moetrain.storage.store import TMP_MARK, Store

MANIFEST = "manifest.json"
LATEST = "latest"
_SEGMENT = re.compile(r"^[A-Za-z0-9._=-]+$")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def check_run(run: str) -> str:
    if not run or "/" in run or not _SEGMENT.match(run) or run in (".", ".."):
        raise InvalidNameError(f"run name {run!r} must be one path segment of [A-Za-z0-9._=-]")
    return run


def check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidNameError(f"checkpoint step {step!r} must be an int >= 0")
    return step


def check_name(name: str) -> str:
    """Validate an object name (raises :class:`InvalidNameError` naming it)."""
    segments = name.split("/") if isinstance(name, str) else [None]
    bad = (
        not name
        or any(s is None or not _SEGMENT.match(s) or s in (".", "..") for s in segments)
        or name == MANIFEST
        or TMP_MARK in name
    )
    if bad:
        raise InvalidNameError(
            f"object name {name!r} must be '/'-separated segments of [A-Za-z0-9._=-], not "
            f"{MANIFEST!r} and without {TMP_MARK!r}"
        )
    return name


def parse_step_dir(segment: str) -> int | None:
    """N for "step-N", else None."""
    m = _STEP_DIR.match(segment)
    return int(m.group(1)) if m else None


def step_prefix(run: str, step: int) -> str:
    return f"{check_run(run)}/step-{check_step(step)}"


def latest_key(run: str) -> str:
    return f"{check_run(run)}/{LATEST}"


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint: ``<store root>/<run>/step-<step>/``."""

    store: Store
    run: str
    step: int

    @property
    def prefix(self) -> str:
        return step_prefix(self.run, self.step)

    @property
    def uri(self) -> str:
        return self.store.uri_of(self.prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST)


@dataclass(frozen=True)
class ObjectEntry:
    """One stored object of a checkpoint, as recorded in the manifest.

    In ``manifest.json`` the key of the digest names its algorithm:
    ``{"name", "size", "crc32c": "<8 hex>"}`` or ``{"name", "size", "sha256": "<64 hex>"}``
    (every manifest before the crc32c default, format v1, has ``sha256`` entries)."""

    name: str  # relative to the checkpoint directory, e.g. "experts/layer-3/expert-17"
    size: int  # bytes
    checksum: str  # the algorithm: crc32c | sha256
    digest: str  # hex digest of the object's bytes under ``checksum``

    def __post_init__(self) -> None:
        if self.checksum not in ALGORITHMS:
            raise CheckpointError(f"object {self.name!r}: checksum {self.checksum!r} is not one of {ALGORITHMS}")

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, self.checksum: self.digest}

    @classmethod
    def from_dict(cls, data: "dict | ObjectEntry") -> "ObjectEntry":
        if isinstance(data, ObjectEntry):
            return data
        try:
            algos = [a for a in ALGORITHMS if a in data]
            if len(algos) != 1:
                raise ValueError(f"needs exactly one checksum key of {ALGORITHMS}, has {algos}")
            return cls(
                name=check_name(str(data["name"])),
                size=int(data["size"]),
                checksum=algos[0],
                digest=str(data[algos[0]]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"bad checkpoint entry {data!r}: {exc}") from exc
