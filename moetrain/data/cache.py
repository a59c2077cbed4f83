"""The on-disk cache of derived data (trained tokenizers, packed Parquet sequences).

Owns: where the cache lives, content-hash keys, atomic writes (temp file + ``os.replace``, so a
reader never sees a half-written file) and a per-key build lock (so several processes building
the same artifact - e.g. Ray actors on one node - do the work once; the rest wait and load).

Location: ``data.cache_dir`` if set, else ``$MOETRAIN_CACHE_DIR`` if set, else
``~/.cache/moetrain``; data artifacts go under ``<cache>/data/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from moetrain.config import DataConfig
from moetrain.data.errors import DataError

try:  # POSIX only; elsewhere builds are still correct (atomic rename), just not deduplicated.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def cache_root(cfg: DataConfig) -> Path:
    """The directory holding data artifacts (created if missing)."""
    base = cfg.cache_dir or os.environ.get("MOETRAIN_CACHE_DIR") or "~/.cache/moetrain"
    root = Path(base).expanduser() / "data"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir {str(root)!r} cannot be created: {exc.strerror}") from None
    return root


def content_key(parts: dict[str, Any]) -> str:
    """A stable sha256 hex key of a JSON-able dict (keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a sibling temp path, then rename it onto ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (blocking) while one process builds ``path``."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached(path: Path, build: Callable[[Path], None], load: Callable[[Path], Any]) -> tuple[Any, bool]:
    """Load ``path`` if present, else build it atomically under the lock. Returns (value, hit)."""
    if path.exists():
        return load(path), True
    with build_lock(path):
        if path.exists():  # another process built it while we waited
            return load(path), True
        write_atomic(path, build)
    return load(path), False
