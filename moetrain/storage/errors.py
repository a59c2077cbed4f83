"""Typed object-store errors. Every message names the URI or key it is about.

``StoreError`` is the base class of every store failure; the checkpoint package extends the same
hierarchy (``moetrain.checkpoint.CheckpointError`` *is* ``StoreError``), so a caller that wants
"checkpoint failed, keep training" catches one class whether the store or the checkpoint logic
failed. Subclasses say *what* went wrong: a store that cannot be reached, a credentials problem,
a missing bucket, a missing object, a name that is not usable as a key.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every store (and checkpoint) failure."""


class StoreUnreachableError(StoreError):
    """The object store did not answer (connection refused, timeouts) after all retries."""


class StoreAccessError(StoreError):
    """Bad or missing credentials, or no permission on the bucket / directory."""


class BucketNotFoundError(StoreError):
    """The bucket (or container) named by the URI does not exist."""


class ObjectNotFoundError(StoreError):
    """An object named by a manifest, a pointer or a caller is absent from the store."""


class InvalidNameError(StoreError, ValueError):
    """A URI, object name, run name or step is not usable as a storage key."""
