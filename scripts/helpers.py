"""Helpers shared by the scripts (benchmarks, tools, experiments, examples) and the tests: each
defined here once, imported as ``scripts.helpers``. Owns: the repository root and the routing
traces' folder; free TCP ports on 127.0.0.1 and a server there that never answers; the CPU's model and flags; ``/proc/self/status``
figures (resident set, its peak); the JSON line a child process prints last; a function run on
every rank of a spawned gloo group; reading a child's stderr up to a line; updating a JSON file;
an elapsed-time log line.

A script run by path (``python scripts/bench/X.py``) first puts the repository root on
``sys.path`` (its one ``sys.path.insert(0, ...parents[2])`` line), then imports from here. Only the
standard library is imported at module level (torch only inside ``run_gloo``'s ranks)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]  # the repository root (scripts/ is its child)
# the Qwen1.5-MoE and OLMoE routing traces: ../shared/traces beside the checkout unless MOETRAIN_TRACES says
TRACES = Path(os.environ.get("MOETRAIN_TRACES") or REPO.parent / "shared" / "traces")


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


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, threading.Event]]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (an address that is
    not a Ray cluster); yields (port, an event set at the first accepted connection)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    accepted, stop, conns = threading.Event(), threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
                accepted.set()
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        stop.set()
        t.join(timeout=5)
        for c in conns:
            c.close()
        srv.close()


def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its ``/proc/cpuinfo`` flags (none where that file is missing)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return model or platform.processor() or platform.machine(), frozenset(flags)


def cpu_facts() -> dict:
    """What a benchmark records about the CPU: model, logical cores, the bf16 instruction sets."""
    model, flags = cpu_model_and_flags()
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags}


def proc_status_kib(key: str) -> int | None:
    """A figure of ``/proc/self/status`` in KiB (``VmRSS``: resident set, ``VmHWM``: its peak);
    None where the file or the key is missing."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def last_json_line(text: str) -> Any:
    """The last line of ``text`` (a child's stdout, a saved log) parsed as JSON: the scripts print
    their JSON line last."""
    return json.loads(text.strip().splitlines()[-1])


def update_json(path: Path, **changes: Any) -> None:
    """Set top-level keys of the JSON object in ``path`` (e.g. a Hugging Face ``config.json``)."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def read_until(proc: subprocess.Popen, needle: str, timeout_s: float = 240) -> str:
    """Read ``proc``'s stderr (a text pipe) until a line holds ``needle``, the stream ends or
    ``timeout_s`` passes (checked at each line); returns what was read."""
    seen, deadline = [], time.monotonic() + timeout_s
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if needle in line or time.monotonic() > deadline:
            break
    return "".join(seen)


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """One progress line, prefixed with the seconds since this module was imported (script start)."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def _gloo_rank(rank: int, world: int, port: int, pg_timeout_s: float, fn, args: tuple, queue) -> None:
    dist = None
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=pg_timeout_s))
        from moetrain.parallel.context import ParallelContext

        queue.put((rank, fn(ParallelContext(rank=rank, world_size=world), *args), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn, world: int, *args, timeout_s: float = 900, pg_timeout_s: float | None = None) -> list:
    """``fn(ctx, *args)`` on each of ``world`` spawned CPU processes (one torch thread each, joined in
    a gloo group on 127.0.0.1 when ``world`` > 1; ``ctx`` a ``ParallelContext``); the results in rank
    order. ``fn`` must be a module-level function and return picklable values. Waits ``timeout_s``
    for each rank's result; ``pg_timeout_s`` (default ``timeout_s``) bounds each collective. A rank
    that raises makes the call raise RuntimeError with every failed rank's traceback."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    pg_timeout = timeout_s if pg_timeout_s is None else pg_timeout_s
    procs = [ctx.Process(target=_gloo_rank, args=(r, world, port, pg_timeout, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = sorted((queue.get(timeout=timeout_s) for _ in range(world)), key=lambda g: g[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {err}" for r, _, err in got if err]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [res for _, res, _ in got]
