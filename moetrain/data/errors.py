"""The one user-facing error type of ``moetrain.data``.

Owns: :class:`DataError`. Every message names the offending path, line, field, domain or number.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input (missing / empty / malformed file, bad ``data.paths`` entry, ...)."""
