"""All-to-all dispatcher on real gloo process groups (4 processes) against the single-rank
dispatcher on the concatenated batch: outputs, input / routing-weight gradients and expert
gradients match for any placement and dedup setting; a skewed batch in which some ranks
receive nothing completes."""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port

WORLD, T, D, F, E, K = 4, 24, 16, 8, 8, 2


def _inputs(rank: int, skew: bool):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=g)
    if skew:  # every token picks experts 0 and 1 (both on rank 0 under contiguous placement)
        ids = torch.tensor([[0, 1]] * T)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x, ids, w / w.sum(1, keepdim=True)


def _worker(rank, port, placement_json, dedup, skew, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        from moetrain.model.moe.dispatcher import LocalDispatcher
        from moetrain.model.moe.experts import GroupedExperts
        from moetrain.parallel.context import ParallelContext
        from moetrain.parallel.dispatcher import AllToAllDispatcher
        from moetrain.parallel.grads import _reduce_replicas
        from placement.placement import Placement

        placement = Placement.from_json(placement_json)
        ctx = ParallelContext(rank=rank, world_size=WORLD)
        local = placement.local_experts(0, rank)
        experts = GroupedExperts(local, D, F, seed=1, layer_index=0, init_std=0.1)
        x, ids, w = _inputs(rank, skew)
        x.requires_grad_(True)
        w.requires_grad_(True)
        disp = AllToAllDispatcher(placement, 0, ctx, dedup=dedup)
        x_ND, meta = disp.dispatch(x, ids, w)
        out = disp.combine(experts(x_ND, meta.tokens_per_slot), meta)
        (out * torch.arange(D)).sum().backward()

        class _Layer:  # the grad helper reads layer.experts
            pass
        layer = _Layer()
        layer.experts = experts
        _reduce_replicas(layer, 0, placement, ctx)

        # Reference: one rank holding every expert, all ranks' tokens concatenated.
        ref_experts = GroupedExperts(list(range(E)), D, F, seed=1, layer_index=0, init_std=0.1)
        xs, idss, ws = zip(*[_inputs(r, skew) for r in range(WORLD)])
        X = torch.cat(xs).requires_grad_(True)
        W = torch.cat(ws).requires_grad_(True)
        ref = LocalDispatcher(list(range(E)), E, 0.0)
        X_ND, rmeta = ref.dispatch(X, torch.cat(idss), W)
        OUT = ref.combine(ref_experts(X_ND, rmeta.tokens_per_slot), rmeta)
        (OUT * torch.arange(D)).sum().backward()

        sl = slice(rank * T, (rank + 1) * T)
        errs = {
            "out": (out - OUT[sl]).abs().max().item(),
            "dx": (x.grad - X.grad[sl]).abs().max().item(),
            "dw": (w.grad - W.grad[sl]).abs().max().item(),
        }
        for name in ("w_gate_SFD", "w_up_SFD", "w_down_SDF"):
            mine = getattr(experts, name).grad
            theirs = getattr(ref_experts, name).grad[torch.as_tensor(local)]
            diff = (mine - theirs) if mine is not None else theirs
            errs[name] = diff.abs().max().item() if diff.numel() else 0.0
        errs["recv_units"] = meta.num_recv_units
        queue.put((rank, errs))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


def _run(placement, dedup, skew=False):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, placement.to_json(), dedup, skew, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(WORLD))
    errors = [e["error"] for e in results.values() if "error" in e]
    assert not errors, errors[0]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _placements():
    from placement.placement import Placement

    return {
        "contiguous": Placement.contiguous(1, E, WORLD),
        "random": Placement.random(1, E, WORLD, seed=11),
        "uneven": Placement.random(1, E, WORLD, seed=2, slots_per_rank=[3, 1, 0, 4]),
        "replicated": Placement.random(1, E, WORLD, seed=4, slots_per_rank=3),
    }


@pytest.mark.parametrize("kind,dedup", [("contiguous", True), ("random", False), ("uneven", True),
                                        ("replicated", False), ("replicated", True)])
def test_all_to_all_matches_single_rank(kind, dedup):
    results = _run(_placements()[kind], dedup)
    for rank, errs in results.items():
        for key in ("out", "dx", "dw", "w_gate_SFD", "w_up_SFD", "w_down_SDF"):
            assert errs[key] < 1e-5, f"rank {rank} {kind} dedup={dedup}: {key} differs by {errs[key]:.2e}"


def test_skewed_batch_where_ranks_receive_nothing_completes():
    from placement.placement import Placement

    results = _run(Placement.contiguous(1, E, WORLD), dedup=True, skew=True)
    assert results[0]["recv_units"] == WORLD * T  # dedup: one unit per token, all to rank 0
    assert all(results[r]["recv_units"] == 0 for r in range(1, WORLD))
    assert all(errs["out"] < 1e-5 for errs in results.values())
