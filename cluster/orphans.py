"""Ray agent processes orphaned by a driver that was killed outright (SIGKILL, OOM killer).

Owns: finding and ending them. When the driver of an embedded local Ray dies without running its
shutdown, Ray's dashboard agent and runtime-env agent are re-parented to init and live on,
holding ports and memory (measured with Ray 2.60: both still alive minutes later; GCS, raylet and
the dashboard exit). An agent counts as orphaned only when all of these hold: its parent is init
(pid 1), its name is one of Ray's agents, it belongs to a session folder whose raylet is gone, and
the driver whose pid ends that session folder's name is gone. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

AGENT_NAMES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
KILL_WAIT_S = 5.0  # how long reap_orphans waits for a SIGKILLed agent to be gone
SESSION = re.compile(r"(/[^\s]*/session_[0-9_-]+_(\d+))/")


@dataclass(frozen=True)
class Orphan:
    pid: int
    name: str
    session: str  # the Ray session folder it belongs to


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ppid(pid: str) -> int:
    stat = _read(Path("/proc") / pid / "stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return -1


def _session_of(pid: str) -> str:
    fd_dir = Path("/proc") / pid / "fd"
    try:
        for fd in fd_dir.iterdir():
            m = SESSION.search(os.readlink(fd) + "/")
            if m:
                return m.group(1)
    except OSError:
        pass
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _raylet_running(session: str) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and "raylet" in _read(proc / "cmdline") and session in _read(proc / "cmdline"):
            return True
    return False


def find_orphans() -> list[Orphan]:
    """Ray agents left behind by a dead driver of an embedded local Ray (see the module doc)."""
    if not Path("/proc/self").exists():
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or _ppid(proc.name) != 1:
            continue
        name = _read(proc / "cmdline")
        if name not in AGENT_NAMES:
            continue
        session = _session_of(proc.name)
        m = SESSION.search(session + "/") if session else None
        if m and not _alive(int(m.group(2))) and not _raylet_running(session):
            found.append(Orphan(int(proc.name), name, session))
    return found


def reap_orphans(grace_s: float = 5.0) -> list[Orphan]:
    """End every orphaned agent (SIGTERM, then SIGKILL after ``grace_s``); returns them."""
    orphans = find_orphans()
    for o in orphans:
        try:
            os.kill(o.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for o in orphans:
        while _alive(o.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(o.pid):
            try:
                os.kill(o.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + KILL_WAIT_S
    while any(_running(o.pid) for o in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    return orphans


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan is a zombie until init reaps it)."""
    stat = _read(Path("/proc") / str(pid) / "stat")
    try:
        return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"
    except IndexError:
        return False
