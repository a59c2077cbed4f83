"""Free TCP ports on 127.0.0.1 for the processes and clusters tests start: the scripts' helper
(``scripts/helpers.py``, the one definition), re-exported for the tests."""

from __future__ import annotations

from scripts.helpers import free_port, free_ports

__all__ = ["free_port", "free_ports"]
