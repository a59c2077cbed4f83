"""Opening a checkpoint root: :func:`moetrain.storage.open_store` with the checkpoint section's
options (retries, fsync, checksum) and the run's one :class:`~moetrain.config.StoreConfig`."""

from __future__ import annotations

from moetrain.checkpoint.errors import InvalidNameError
from moetrain.config import CheckpointConfig, StoreConfig
from moetrain.storage import Store, open_store
from moetrain.storage.checksum import ALGORITHMS


def open_root(
    uri: str, cfg: CheckpointConfig | None = None, store_cfg: StoreConfig | None = None, *, probe: bool = True, **kwargs
) -> Store:
    """The checkpoint store at ``uri`` (a root, not a run or step URI): endpoints from
    ``store_cfg`` (the ``storage`` section), retries / fsync / checksum from ``cfg`` (the
    ``checkpoint`` section); ``kwargs`` go to :func:`~moetrain.storage.open_store`."""
    cfg = cfg or CheckpointConfig()
    if not uri:
        raise InvalidNameError("checkpoint URI is empty (set checkpoint.uri)")
    if cfg.max_retries < 0:
        raise InvalidNameError(f"checkpoint.max_retries ({cfg.max_retries}) must be >= 0")
    if cfg.checksum not in ALGORITHMS:
        raise InvalidNameError(f"checkpoint.checksum ({cfg.checksum!r}) must be one of {ALGORITHMS}")
    return open_store(
        uri,
        store_cfg,
        max_retries=cfg.max_retries,
        fsync=cfg.fsync,
        checksum=cfg.checksum,
        probe=probe,
        what="checkpoint",
        **kwargs,
    )
