"""Gradient reduction over ranks (moetrain/parallel/grads.py) against hand-computed values, on a
real 2-process gloo group.

Placement (one MoE layer, E = 4, slots per rank [3, 2]): rank 0 slots hold experts [1, 2, 0],
rank 1 slots hold experts [0, 3]. Expert 0 has two replicas (primary: rank 0 slot 2).
Every gradient is set by hand to a constant v per slot: v = 10 * rank + local slot + 1, times
1, 2, 3 for w_gate, w_up, w_down. So before reduction

    rank 0: expert 1 -> 1, expert 2 -> 2, expert 0 -> 3;   rank 1: expert 0 -> 11, expert 3 -> 12

and after it (summed over replicas, then divided by the world size 2)

    expert 0 -> (3 + 11) / 2 = 7 on both replicas, expert 1 -> 0.5, expert 2 -> 1, expert 3 -> 6.

Dense: parameter a has grad (rank + 1) * [1, 2] -> mean [1.5, 3]; parameter b has no grad on
rank 0 and [4, 4] on rank 1 -> [2, 2]. Global norm: dense once, each logical expert once; one
expert of value v holds 2 entries in each of the three matrices: 2 v^2 (1 + 4 + 9) = 28 v^2.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from moetrain.model.moe.experts import GroupedExperts
from moetrain.parallel import grads
from moetrain.parallel.context import ParallelContext
from placement.placement import Placement
from tests.gloo import run_gloo

D, F = 2, 1
PHY2LOG = [[1, 2, 0, 0, 3]]
SLOTS = (3, 2)
EXPERT_AFTER = {0: 7.0, 1: 0.5, 2: 1.0, 3: 6.0}
DENSE_SQ = 1.5 ** 2 + 3.0 ** 2 + 2.0 ** 2 + 2.0 ** 2
EXPERT_SQ = 28 * sum(v * v for v in EXPERT_AFTER.values())
MULT = {"w_gate_SFD": 1.0, "w_up_SFD": 2.0, "w_down_SDF": 3.0}


def _layer(placement: Placement, rank: int):
    local = placement.local_experts(0, rank)
    layer = types.SimpleNamespace(experts=GroupedExperts(local, D, F, seed=0, layer_index=0, init_std=0.1))
    for name, p in zip(grads.EXPERT_PARAM_NAMES, grads.expert_params(layer)):
        p.grad = torch.stack([torch.full(p.shape[1:], MULT[name] * (10 * rank + s + 1)) for s in range(len(local))])
    return layer


def _reduce(ctx: ParallelContext, phy2log: list, slots: tuple) -> dict:
    placement = Placement(np.array(phy2log), slots, 4)
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = (ctx.rank + 1) * torch.tensor([1.0, 2.0])
    if ctx.rank == 1:
        b.grad = torch.tensor([4.0, 4.0])
    layer = _layer(placement, ctx.rank)
    grads.sync_dense_grads([a, b], ctx)
    grads.sync_expert_grads([layer], placement, ctx)
    norm = grads.global_grad_norm([a, b], [layer], placement, ctx)
    out = {"a": a.grad.tolist(), "b": b.grad.tolist(), "norm": norm.item(),
           "experts": {name: p.grad[:, 0, 0].tolist() for name, p in
                       zip(grads.EXPERT_PARAM_NAMES, grads.expert_params(layer))},
           "local": placement.local_experts(0, ctx.rank).tolist()}
    params = [a, b] + grads.expert_params(layer)
    grads.clip_grads_(params, norm, max_norm=norm.item() / 4)  # every gradient x 1/4, on every rank
    out["clipped_a"] = a.grad.tolist()
    out["clipped_experts"] = grads.expert_params(layer)[0].grad[:, 0, 0].tolist()
    return out


@pytest.fixture(scope="module")
def replicated():
    return run_gloo(_reduce, 2, PHY2LOG, SLOTS)


def test_dense_grads_are_averaged_over_ranks(replicated):
    for r in replicated:
        assert r["a"] == pytest.approx([1.5, 3.0])
        assert r["b"] == pytest.approx([2.0, 2.0])  # a rank without a grad contributes zeros


def test_expert_grads_summed_over_replicas_then_averaged(replicated):
    for r in replicated:
        for name, values in r["experts"].items():
            expected = [MULT[name] * EXPERT_AFTER[e] for e in r["local"]]
            assert values == pytest.approx(expected), f"{name} on local experts {r['local']}"


def test_global_norm_counts_dense_once_and_each_logical_expert_once(replicated):
    expected = math.sqrt(DENSE_SQ + EXPERT_SQ)
    for r in replicated:
        assert r["norm"] == pytest.approx(expected, rel=1e-6)


def test_clipping_scales_every_gradient_on_every_rank_by_the_same_factor(replicated):
    scale = 0.25 * (1 - 1e-6 / (math.sqrt(DENSE_SQ + EXPERT_SQ) + 1e-6))  # max / (norm + 1e-6)
    for r in replicated:
        assert r["clipped_a"] == pytest.approx([1.5 * scale, 3.0 * scale], rel=1e-6)
        assert r["clipped_experts"] == pytest.approx([EXPERT_AFTER[e] * scale for e in r["local"]], rel=1e-6)


def test_without_replicas_expert_grads_are_only_divided_by_the_world_size():
    """Contiguous: rank 0 holds experts [0, 1] (v = 1, 2), rank 1 [2, 3] (v = 11, 12)."""
    ranks = run_gloo(_reduce, 2, [[0, 1, 2, 3]], (2, 2))
    for r, expected in zip(ranks, ([0.5, 1.0], [5.5, 6.0])):
        assert r["experts"]["w_gate_SFD"] == pytest.approx(expected)
    assert ranks[0]["norm"] == pytest.approx(math.sqrt(DENSE_SQ + 28 * (0.25 + 1 + 30.25 + 36)), rel=1e-6)


def test_clip_in_one_process_by_hand():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([3.0, 4.0])
    grads.clip_grads_([a, b], torch.tensor(5.0), max_norm=1.0)  # b has no grad: skipped
    assert a.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    assert b.grad is None
    grads.clip_grads_([a], torch.tensor(0.5), max_norm=1.0)  # under the limit: unchanged
    assert a.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)


def test_only_replicated_experts_enter_the_replica_all_reduce():
    """Rank 0 holds [1, 2, 0], rank 1 [0, 3]: only expert 0 has two replicas, so each rank puts
    one row in the buffer (its slot of expert 0); two replicated experts on two layers: 2 rows."""
    placement = Placement(np.array(PHY2LOG), SLOTS, 4)
    assert grads._replica_rows(placement, 0, 0) == ([2], [0], 1)
    assert grads._replica_rows(placement, 0, 1) == ([0], [0], 1)
    two = Placement(np.array([[0, 1, 2, 0, 1, 3], [3, 2, 1, 0, 3, 1]]), (3, 3), 4)  # layer 0: 0, 1 twice; 1: 1, 3
    assert grads._replica_rows(two, 0, 0) == ([0, 1], [0, 1], 2) and grads._replica_rows(two, 0, 1) == ([0, 1], [0, 1], 2)
    assert grads._replica_rows(two, 1, 0) == ([0, 2], [1, 0], 2) and grads._replica_rows(two, 1, 1) == ([1, 2], [1, 0], 2)
