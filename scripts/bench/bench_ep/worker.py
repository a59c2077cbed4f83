"""The benchmark's process groups: ``run_group`` spawns one process per rank (one intra-op
thread each, gloo on 127.0.0.1, or NCCL with one GPU per rank) and gathers what each rank puts
on a queue; ``rank_main`` is a rank of the main group, which runs the layer (1), dedup (4) and
whole-model (2) studies in that order."""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scripts.helpers import free_port

from .common import RankEnv, peak_rss_mb, rss_mb
from .ds_baseline import release_deepspeed_shm

PG_TIMEOUT_S = 300  # process-group init and collectives
GROUP_TIMEOUT_S = 900  # wait for each rank's result
JOIN_TIMEOUT_S = 30


def _barrier_of(ctx, device):
    if device.type != "cuda":
        return ctx.barrier

    def barrier():
        torch.cuda.synchronize()
        ctx.barrier()
    return barrier


def run_rank(rank: int, ws: int, args, device) -> dict:
    """Every study of one rank, on the process group already set up."""
    from moetrain.parallel.context import ParallelContext

    from .dedup import dedup_study
    from .layer import layer_setup, layer_study
    from .model import model_study
    ctx = ParallelContext(rank=rank, world_size=ws, device=device)
    res: dict = {}
    if args.deepspeed:
        from .ds_baseline import init_deepspeed_comm
        res["ds_init_s"] = init_deepspeed_comm()
    env = RankEnv(rank, ws, args, ctx, device, args.deepspeed, _barrier_of(ctx, device))
    setup = layer_setup(env)
    res.update(layer_study(setup))
    if args.dedup_study:  # fp32 traffic counts: once, in the first precision pass
        res["dedup"] = dedup_study(setup)
    if args.model_iters > 0:
        res.update(model_study(env))
    env.barrier()
    return res


def rank_main(rank: int, ws: int, port: int, args, queue, device_kind: str) -> None:
    """Process entry of one rank of the main group; puts ``(rank, results)`` or
    ``(rank, {"error": traceback})`` on ``queue``."""
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(ws), LOCAL_RANK=str(rank), LOCAL_SIZE=str(ws))
        backend = "nccl" if device_kind == "cuda" else "gloo"
        device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        rss0 = rss_mb()
        out = run_rank(rank, ws, args, device)
        out["rss_after_init_mb"] = rss0
        out["peak_rss_mb"] = peak_rss_mb()
        queue.put((rank, out))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(ws: int, args, target=rank_main, extra=(), device_kind="cpu",
              timeout=GROUP_TIMEOUT_S) -> dict[int, dict]:
    """Spawn ``ws`` processes running ``target(rank, ws, port, args, queue, device_kind, *extra)``;
    returns {rank: results}; raises with the first rank's traceback if any rank failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, ws, port, args, queue, device_kind) + tuple(extra))
             for r in range(ws)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(ws):
            r, out = queue.get(timeout=timeout)
            results[r] = out
    finally:
        for p in procs:
            p.join(timeout=JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
        release_deepspeed_shm(port)
    errors = [o["error"] for o in results.values() if "error" in o]
    if errors:
        raise RuntimeError(f"world {ws} failed:\n{errors[0]}")
    return results
