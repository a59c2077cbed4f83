"""Typed checkpoint errors. Every message names the URI, key or object it is about.

``CheckpointError`` is the base class: a caller that wants "checkpoint failed, keep training"
catches only it. Subclasses say *what* went wrong so callers (and tests) can tell apart a store
that cannot be reached, a credentials problem, a missing bucket, a missing or corrupt object,
a checkpoint that was never committed, and user input that cannot be serialised.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every checkpoint failure."""


class StoreUnreachableError(CheckpointError):
    """The object store did not answer (connection refused, timeouts) after all retries."""


class StoreAccessError(CheckpointError):
    """Bad or missing credentials, or no permission on the bucket / directory."""


class BucketNotFoundError(CheckpointError):
    """The bucket (or container) named by the URI does not exist."""


class ObjectNotFoundError(CheckpointError):
    """An object named by a manifest, a pointer or a caller is absent from the store."""


class CorruptObjectError(CheckpointError):
    """An object's bytes do not match the size / checksum recorded in the manifest."""


class NotCommittedError(CheckpointError):
    """A checkpoint directory has no ``manifest.json`` (or a run has no committed checkpoint)."""


class SerializationError(CheckpointError):
    """An object could not be serialised (an unsupported value, or its data raised while being
    written); the message names the object and, where known, the path inside its state dict."""


class InvalidNameError(CheckpointError, ValueError):
    """An object name, run name or step is not usable as a storage key."""


class TornSnapshotError(CheckpointError):
    """A tensor changed while an overlapped snapshot was copying it (the fence was not used)."""
