"""cluster.collective_timeout_s reaches the process group: a collective whose peer never arrives
fails within that bound instead of Gloo's default 30 minutes (or the former hard-coded 300 s)."""

from __future__ import annotations

import time

import torch.multiprocessing as mp

from tests.ports import free_port


def _rank(rank: int, port: int, timeout_s: float, queue) -> None:
    import torch

    from moetrain.parallel.context import init_distributed

    ctx = init_distributed(backend="gloo", master_addr="127.0.0.1", master_port=port, rank=rank,
                           world_size=2, timeout_s=timeout_s)
    if rank == 1:
        time.sleep(30)  # alive but never joins the collective (a stopped or stuck peer)
        return
    t0 = time.monotonic()
    try:
        ctx.all_reduce_sum(torch.ones(4))
        queue.put(("finished", time.monotonic() - t0))
    except RuntimeError as exc:
        queue.put((type(exc).__name__, time.monotonic() - t0))


def test_a_collective_without_its_peer_fails_within_the_configured_timeout():
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, 3.0, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        outcome, waited = queue.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=10)
    assert outcome != "finished"
    assert 2.0 <= waited < 20.0, waited  # the configured 3 s, not minutes
