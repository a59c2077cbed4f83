"""Object checksums: CRC32C (default) or sha256, streamed or one-shot, hex digests.

Owns: the algorithm names a manifest may record (``ALGORITHMS``), a hashlib-like streaming
hasher per algorithm (``new_hasher``) and the one-shot ``digest``.

- ``crc32c`` (default, ``checkpoint.checksum``): CRC-32C (Castagnoli), the checksum S3
  (``x-amz-checksum-crc32c``) and GCS (``crc32c`` object metadata) use themselves, computed
  by the ``google-crc32c`` package's C extension (SSE4.2 / ARMv8 CRC instructions): ~11 GB/s
  per core here vs ~1.7 GB/s for sha256, so hashing no longer bounds a local upload. It
  detects every 1-, 2- and 3-bit error and every burst up to 32 bits (a flipped byte
  included): it guards against corruption, not against someone forging an object.
- ``sha256``: the previous default, still written when configured and always readable (a
  manifest names the algorithm of each object).

Digests are lowercase hex: sha256 64 characters, crc32c 8 (the 32-bit value, big-endian, as
GCS and S3 encode it before base64).

``google_crc32c.extend`` accepts only read-only buffers (``bytes``) and releases the GIL only
for ``bytes`` of at least 1 MiB, so tensor memory is hashed through ``COPY_BYTES`` copies:
a bounded temporary, and the copy + CRC still run at ~11 GB/s (measured, 8 MiB slices).
"""

from __future__ import annotations

import hashlib
import logging

import google_crc32c

log = logging.getLogger(__name__)

CRC32C = "crc32c"
SHA256 = "sha256"
ALGORITHMS = (CRC32C, SHA256)
DEFAULT = CRC32C
COPY_BYTES = 4 << 20  # crc32c: hash large buffers through copies of at most this size

if google_crc32c.implementation != "c":  # pragma: no cover - the wheels ship the C extension
    log.warning("google-crc32c has no C extension here: crc32c checksums run in pure Python "
                "(slow); set checkpoint.checksum=sha256 or install a google-crc32c wheel")


def check_algorithm(name: str, what: str = "checkpoint.checksum") -> str:
    """``name`` if it is a known algorithm; else ValueError naming ``what``."""
    if name not in ALGORITHMS:
        raise ValueError(f"{what} ({name!r}) must be one of {ALGORITHMS}")
    return name


class Crc32c:
    """Streaming CRC-32C with the hashlib interface (``update``, ``hexdigest``)."""

    name = CRC32C

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data) -> None:
        if isinstance(data, bytes):
            self._crc = google_crc32c.extend(self._crc, data)
            return
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, COPY_BYTES):
            self._crc = google_crc32c.extend(self._crc, bytes(view[start:start + COPY_BYTES]))

    @property
    def value(self) -> int:
        return self._crc

    def hexdigest(self) -> str:
        return f"{self._crc:08x}"


def new_hasher(algorithm: str):
    """A fresh streaming hasher (``update(buffer)``, ``hexdigest()``) for ``algorithm``."""
    if algorithm == CRC32C:
        return Crc32c()
    if algorithm == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {ALGORITHMS})")


def digest(algorithm: str, data) -> str:
    """The hex digest of ``data`` (any buffer) under ``algorithm``."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()
