"""Outside probes (issue #23): each reproduces one failure a careless or hostile user met.

Every module ``scripts/tools/probes/p_<area>.py`` defines ``PROBES``: a list of :class:`Probe`. A probe's
``run(tmp)`` gets a fresh temporary folder and returns ``(passed, detail)``: ``passed`` is True
when moetrain now handles the case (one line, the right exit status, nothing leaked or lost),
``detail`` one line saying what was seen. Run them all with

    .venv/bin/python -m scripts.tools.probes [--only SUBSTRING] [--json]

which prints a table and one JSON line with the counts (exit 1 if any probe fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Probe:
    name: str  # what a user did, in a few words
    item: str  # the issue item it belongs to, e.g. "23.1"
    run: Callable[[Path], tuple[bool, str]]
