"""Run a function on every rank of a fresh gloo group of spawned CPU processes (one torch thread
each, as a Ray actor of the default run) and collect what each rank returns.

Peak memory of a rank: the kernel's high-water mark of its resident set (``VmHWM``), reset with
``/proc/self/clear_refs`` (5 = reset the peak) once the process has imported everything and loaded
the data, minus the resident set at that moment. That is what the operating system charges the
training step itself, allocator slack included; torch keeps no CPU allocator statistics.
"""

from __future__ import annotations

import datetime
import os
import re
import traceback

import torch.multiprocessing as mp

from scripts.helpers import free_port

RANK_TIMEOUT_S = 900


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1))


def reset_peak_rss() -> int:
    """Reset the peak resident set to the current one; returns the current resident bytes."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return status_kib("VmHWM") * 1024


def _entry(rank: int, world: int, port: int, fn, args: tuple, queue) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
        from moetrain.parallel.context import ParallelContext

        queue.put((rank, fn(ParallelContext(rank=rank, world_size=world), *args), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(fn, world: int, *args) -> list:
    """``fn(ctx, *args)`` on ``world`` spawned ranks; results in rank order (raises on any error)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = sorted((queue.get(timeout=RANK_TIMEOUT_S) for _ in range(world)), key=lambda g: g[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {err}" for r, _, err in got if err]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [res for _, res, _ in got]
