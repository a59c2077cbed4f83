"""Helpers shared by the scripts (benchmarks, tools, experiments, examples) and the tests: each
defined here once, imported as ``scripts.helpers``. Owns: the repository root (``REPO``) and
picking free TCP ports on 127.0.0.1 for the process groups and clusters the scripts start.

A script run by path (``python scripts/bench/X.py``) first puts the repository root on
``sys.path`` (its one ``sys.path.insert(0, ...parents[2])`` line), then imports from here."""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository root (scripts/ is its child)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all sockets are held until every port is picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
