"""Opening a data store: :func:`moetrain.storage.open_store` for corpora, prepared shards and
tokenizers, with failures reported as :class:`~moetrain.data.errors.DataError` naming the URI."""

from __future__ import annotations

from moetrain.config import StoreConfig
from moetrain.data.errors import DataError
from moetrain.storage import Store, StoreError, open_store


def open_data_store(uri: str, store: StoreConfig | None = None, *, probe: bool = True) -> Store:
    """The store at ``uri`` (local path, ``s3://``, ``gs://``) with the run's endpoints
    (``store``: the ``storage`` section); data is not fsync-ed object by object."""
    try:
        return open_store(uri, store, fsync=False, probe=probe, what="data")
    except StoreError as exc:
        raise DataError(f"data store {uri}: {exc}") from None
