"""Sharded checkpoints streamed to object storage (local dirs, S3, GCS via ``pyarrow.fs``).

Owns checkpoint I/O for one process; knows nothing of Ray (the cluster layer calls it from
actors and the driver). Generic over *what* is saved: each rank hands a mapping
``{object name: state dict of tensors and small values}`` (e.g. ``dense/rank-0``,
``experts/layer-3/expert-17``, ``rng/rank-2``), the driver a JSON-able ``meta``.

Flow::

    store  = open_root(cfg.checkpoint.uri, cfg.checkpoint, cfg.storage)  # every process
    writer = AsyncCheckpointWriter(store, run, rank=r)                # every rank
    fut    = writer.save(step, objects)     # snapshot now, upload in the background
    #  (snapshot_mode="overlap" + writer.install_fence(optimizer): copy during the next step)
    result = fut.result()                   # SaveResult(entries={name, size, crc32c digest})
    commit(store, run, step, [result_rank0, result_rank1, ...], meta)  # driver: manifest, latest
    apply_retention(store, run, keep=cfg.checkpoint.keep)
    ref    = resolve("latest", cfg.checkpoint, run=run, store_cfg=cfg.storage)  # on resume
    states = load_objects(ref, names_this_rank_hosts)   # checksum-checked

Checksums: CRC32C by default (``checkpoint.checksum``; sha256 optional); each manifest entry
names its algorithm, so checkpoints written with sha256 (all before v2 manifests) still load.

Stores (``Store``, ``open_store``, checksums, typed store errors) are :mod:`moetrain.storage`;
``root`` opens a checkpoint root with the checkpoint options. Modules: ``format`` (the object
byte format), ``layout`` (keys), ``lease`` (one writer per run name), ``snapshot`` (host
copies), ``writer`` (async writer), ``manifest`` (commit), ``retention`` (list / keep N /
clean), ``reader`` (resolve / verify / load), ``cli`` (``moetrain ckpt ...``).
"""

from moetrain.checkpoint.errors import (
    BucketNotFoundError,
    CheckpointError,
    CorruptObjectError,
    InvalidNameError,
    NotCommittedError,
    ObjectNotFoundError,
    SerializationError,
    StoreAccessError,
    StoreUnreachableError,
    TornSnapshotError,
)
from moetrain.checkpoint.layout import CheckpointRef, ObjectEntry
from moetrain.checkpoint.lease import Lease, LeaseHeldError, LeaseLostError
from moetrain.checkpoint.manifest import Manifest, commit, read_latest, read_manifest
from moetrain.checkpoint.reader import VerifyReport, load_objects, resolve, verify
from moetrain.checkpoint.retention import (
    CheckpointInfo,
    CleanReport,
    apply_retention,
    clean,
    list_checkpoints,
)
from moetrain.checkpoint.root import open_root
from moetrain.checkpoint.snapshot import Snapshot, snapshot
from moetrain.checkpoint.writer import AsyncCheckpointWriter, CheckpointFuture, SaveResult
from moetrain.storage import Store, open_store

__all__ = [
    "AsyncCheckpointWriter",
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointFuture",
    "CheckpointInfo",
    "CheckpointRef",
    "CleanReport",
    "CorruptObjectError",
    "InvalidNameError",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "Manifest",
    "NotCommittedError",
    "ObjectEntry",
    "ObjectNotFoundError",
    "SaveResult",
    "SerializationError",
    "Snapshot",
    "Store",
    "StoreAccessError",
    "StoreUnreachableError",
    "TornSnapshotError",
    "VerifyReport",
    "apply_retention",
    "clean",
    "commit",
    "list_checkpoints",
    "load_objects",
    "open_root",
    "open_store",
    "read_latest",
    "read_manifest",
    "resolve",
    "snapshot",
    "verify",
]
