"""Expert migration: the transfer plan by hand, and the exchange on real gloo processes with every
weight and AdamW moment compared exactly (a migration that skips the optimizer state, sends the
wrong rows, or moves experts that stay fails here, not only as a 1e-5 drift in a loss curve)."""

from __future__ import annotations

import datetime
import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.parallel.migrate import MigrationError, Move, plan_migration
from placement.placement import Placement
from tests.ports import free_port

D, F = 3, 2  # tiny expert shapes: w_gate/w_up [F, D], w_down [D, F]
KINDS = ("w_gate_SFD", "w_up_SFD", "w_down_SDF")


def P(rows, spr, E):
    return Placement(np.array(rows), tuple(spr), E)


# ---- the plan (pure) ---------------------------------------------------------------------------
def test_plan_swaps_across_ranks():
    old = P([[0, 1, 2, 3]], (2, 2), 4)  # rank 0: {0, 1}; rank 1: {2, 3}
    new = P([[0, 2, 1, 3]], (2, 2), 4)  # experts 1 and 2 trade places
    assert plan_migration(old, new) == [Move(0, 2, 1, 0, 0, 1), Move(0, 1, 0, 1, 1, 0)]


def test_plan_reorder_within_a_rank_is_a_local_copy():
    old = P([[0, 1, 2, 3]], (2, 2), 4)
    new = P([[1, 0, 2, 3]], (2, 2), 4)
    moves = plan_migration(old, new)
    assert moves == [Move(0, 1, 0, 1, 0, 0), Move(0, 0, 0, 0, 0, 1)]
    assert not any(m.remote for m in moves)


def test_plan_skips_unchanged_layers_and_reads_from_the_primary_replica():
    old = P([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]], (3, 3), 4)  # experts 0 and 1 replicated
    new = P([[0, 1, 2, 3, 0, 1], [0, 3, 2, 1, 0, 2]], (3, 3), 4)
    moves = plan_migration(old, new)
    # layer 0 unchanged; layer 1: rank 0 slot 1 <- expert 3 (primary at rank 1, local slot 0);
    # rank 1 slot 0 <- expert 1 (its old holders on rank 1 include local slot 2: a local copy);
    # rank 1 slot 2 <- expert 2 (primary at rank 0, local slot 2).
    assert moves == [Move(1, 3, 1, 0, 0, 1), Move(1, 1, 1, 2, 1, 0), Move(1, 2, 0, 2, 1, 2)]


def test_plan_refuses_a_different_shape():
    with pytest.raises(MigrationError, match="slots per rank"):
        plan_migration(P([[0, 1, 2, 3]], (2, 2), 4), P([[0, 1, 2, 3]], (3, 1), 4))


# ---- the exchange on gloo ----------------------------------------------------------------------
def _value(layer: int, expert: int, tensor: int) -> float:
    """What every element of expert ``expert``'s ``tensor`` (0-8: 3 weights x {param, m, v}) holds."""
    return 1000.0 * layer + 10.0 * expert + tensor


def _fill(layer: int, local, shape, tensor: int) -> torch.Tensor:
    """[S, *shape]: each slot's rows encode (layer, expert, tensor) plus a within-row ramp."""
    ramp = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape) * 1e-3
    return torch.stack([torch.full(shape, _value(layer, int(e), tensor)) + ramp for e in local])


class _Experts(torch.nn.Module):
    def __init__(self, layer: int, local):
        super().__init__()
        self.local_experts = tuple(int(e) for e in local)
        for i, (name, shape) in enumerate(zip(KINDS, [(F, D), (F, D), (D, F)])):
            self.register_parameter(name, torch.nn.Parameter(_fill(layer, local, shape, 3 * i)))


class _Layer:
    def __init__(self, layer: int, local):
        self.experts = _Experts(layer, local)


def _worker(rank, world, port, old_json, new_json, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        from moetrain.parallel.context import ParallelContext
        from moetrain.parallel.migrate import migrate_experts

        old, new = Placement.from_json(old_json), Placement.from_json(new_json)
        layers = [_Layer(l, old.local_experts(l, rank)) for l in range(old.num_layers)]
        params = [getattr(layer.experts, n) for layer in layers for n in KINDS]
        opt = torch.optim.AdamW(params, lr=1e-3)
        for l, layer in enumerate(layers):
            for i, name in enumerate(KINDS):
                p = getattr(layer.experts, name)
                shape = tuple(p.shape[1:])
                opt.state[p] = {"step": torch.tensor(7.0),
                                "exp_avg": _fill(l, old.local_experts(l, rank), shape, 3 * i + 1),
                                "exp_avg_sq": _fill(l, old.local_experts(l, rank), shape, 3 * i + 2)}
        report = migrate_experts(layers, opt, old, new, ParallelContext(rank=rank, world_size=world))
        errs = []
        for l, layer in enumerate(layers):
            local = new.local_experts(l, rank)
            if layer.experts.local_experts != tuple(int(e) for e in local):
                errs.append(f"layer {l}: local_experts {layer.experts.local_experts} != {tuple(local)}")
            for i, name in enumerate(KINDS):
                p = getattr(layer.experts, name)
                shape = tuple(p.shape[1:])
                st = opt.state[p]
                for got, kind in ((p.data, 0), (st["exp_avg"], 1), (st["exp_avg_sq"], 2)):
                    want = _fill(l, local, shape, 3 * i + kind)
                    if not torch.equal(got, want):
                        errs.append(f"layer {l} {name} tensor {kind}: got {got[:, 0, 0].tolist()} "
                                    f"want {want[:, 0, 0].tolist()}")
                if float(st["step"]) != 7.0:
                    errs.append("AdamW step count changed")
        queue.put((rank, {"errors": errs, "report": report}))
    except Exception:
        queue.put((rank, {"errors": [traceback.format_exc()]}))
    finally:
        dist.destroy_process_group()


def _run(old: Placement, new: Placement, world: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, old.to_json(), new.to_json(), queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    for rank, res in sorted(results.items()):
        assert not res["errors"], f"rank {rank}: " + "\n".join(res["errors"][:5])
    return {r: res["report"] for r, res in results.items()}


EXPERT_BYTES = 3 * 3 * F * D * 4  # 3 matrices x (weight, exp_avg, exp_avg_sq) x F*D floats


def test_migration_moves_weights_and_adam_state_exactly_and_counts_real_bytes():
    # 3 ranks, 2 layers, 6 experts, 2 slots per rank. Layer 0: a 3-cycle of experts 1 -> 3 -> 5;
    # layer 1: rank 0 reorders its own experts (local copies only).
    old = Placement.contiguous(2, 6, 3)  # [0 1 | 2 3 | 4 5]
    new = P([[0, 5, 2, 1, 4, 3], [1, 0, 2, 3, 4, 5]], (2, 2, 2), 6)
    reports = _run(old, new, 3)
    # Each rank receives exactly one expert from another rank and sends exactly one.
    for rank in range(3):
        r = reports[rank]
        assert (r.experts_received, r.experts_sent) == (1, 1), (rank, r)
        assert r.bytes_received == r.bytes_sent == EXPERT_BYTES, (rank, r)
        # by destination (the traffic counters' link classes): rank r sends to rank r + 1
        assert r.bytes_sent_R == tuple(EXPERT_BYTES if p == (rank + 1) % 3 else 0 for p in range(3)), (rank, r)


def test_migration_with_replicas_and_uneven_slots():
    old = P([[0, 1, 2, 3, 0, 1, 4, 5]], (3, 1, 4), 6)
    new = P([[4, 1, 0, 5, 2, 3, 0, 1]], (3, 1, 4), 6)
    reports = _run(old, new, 3)
    # rank 0 gets 4 (from rank 2) and 0 (local slot 0); rank 1 gets 5 (from rank 2);
    # rank 2 gets 2 (from rank 0), 3 (from rank 1), 0 and 1 (already local).
    assert [reports[r].experts_received for r in range(3)] == [1, 1, 2]
    assert [reports[r].experts_sent for r in range(3)] == [1, 1, 2]
    assert sum(reports[r].bytes_sent for r in range(3)) == 4 * EXPERT_BYTES
