"""Run a function on every rank of a real multi-process gloo group, for unit tests of code that
calls collectives (gradient reduction, global load-balancing counts).

``run_gloo(fn, world_size, *args)`` spawns ``world_size`` processes, joins them into a gloo
group on 127.0.0.1, calls ``fn(ctx, *args)`` on each (``ctx`` a
:class:`~moetrain.parallel.context.ParallelContext`) and returns the results in rank order.
``fn`` must be a module-level function (spawn pickles it by name) and return picklable values.
A rank that raises makes the call fail with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port

TIMEOUT_S = 120


def _entry(rank: int, world_size: int, port: int, fn, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 4))
    try:
        from moetrain.parallel.context import ParallelContext

        queue.put((rank, fn(ParallelContext(rank=rank, world_size=world_size), *args), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, *args) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=TIMEOUT_S) for _ in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {rank}: {err}" for rank, _, err in sorted(got, key=lambda g: g[0]) if err]
    assert not errors, "\n".join(errors)
    return [res for _, res, _ in sorted(got, key=lambda g: g[0])]
