"""Typed checkpoint errors. Every message names the URI, key or object it is about.

The store errors (unreachable, access, bucket, object, name) live in
:mod:`moetrain.storage.errors` and are re-exported here. ``CheckpointError`` is the base class
(the same class as ``StoreError``): a caller that wants "checkpoint failed, keep training"
catches only it. Subclasses say *what* went wrong so callers (and tests) can tell apart a store
that cannot be reached, a credentials problem, a missing bucket, a missing or corrupt object,
a checkpoint that was never committed, and user input that cannot be serialised.
"""

from __future__ import annotations

from moetrain.storage.errors import (  # noqa: F401  (re-exported: the checkpoint package's errors)
    BucketNotFoundError,
    InvalidNameError,
    ObjectNotFoundError,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
)

CheckpointError = StoreError  # one hierarchy: a store failure is a checkpoint failure


class CorruptObjectError(CheckpointError):
    """An object's bytes do not match the size / checksum recorded in the manifest."""


class NotCommittedError(CheckpointError):
    """A checkpoint directory has no ``manifest.json`` (or a run has no committed checkpoint)."""


class SerializationError(CheckpointError):
    """An object could not be serialised (an unsupported value, or its data raised while being
    written); the message names the object and, where known, the path inside its state dict."""


class TornSnapshotError(CheckpointError):
    """A tensor changed while an overlapped snapshot was copying it (the fence was not used)."""
