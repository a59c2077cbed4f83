"""moetrain.storage: the one owner of object stores (local directories, S3, GCS via pyarrow.fs).

Checkpoints, prepared data, tokenizers and Hugging Face import / export all open their roots
here, with one :class:`~moetrain.config.StoreConfig` (the run config's ``storage`` section)::

    store = open_store("s3://bucket/prefix", cfg.storage)
    store.write_atomic("a/b.json", lambda sink: sink.write(b"{}"))
    store.read_bytes("a/b.json")

Modules: ``store`` (:class:`Store`: streaming writes with checksums, reads, listing, deletes,
retries, typed errors), ``open`` (:func:`open_store`: scheme, endpoints, region, probe),
``sink`` (hashing + local durability while streaming), ``checksum`` (crc32c / sha256),
``errors`` (the typed errors).
"""

from moetrain.config import StoreConfig
from moetrain.storage.errors import (
    BucketNotFoundError,
    InvalidNameError,
    ObjectNotFoundError,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
)
from moetrain.storage.open import open_store
from moetrain.storage.store import FileEntry, Store, WriteResult, redact_uri

__all__ = [
    "BucketNotFoundError",
    "FileEntry",
    "InvalidNameError",
    "ObjectNotFoundError",
    "Store",
    "StoreAccessError",
    "StoreConfig",
    "StoreError",
    "StoreUnreachableError",
    "WriteResult",
    "open_store",
    "redact_uri",
]
