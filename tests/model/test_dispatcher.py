"""Tests for moetrain.model.moe.dispatcher (with real GroupedExperts)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moetrain.model.moe.dispatcher import (DispatchMeta, Dispatcher, LocalDispatcher, capacity_keep_mask,
                                           expert_capacity)
from moetrain.model.moe.experts import GroupedExperts

D, FF = 8, 12


def expert_ref(experts: GroupedExperts, slot: int, x_D: torch.Tensor) -> torch.Tensor:
    h = F.silu(experts.w_gate_SFD[slot] @ x_D) * (experts.w_up_SFD[slot] @ x_D)
    return experts.w_down_SDF[slot] @ h


def naive_moe(experts, x_TD, ids_TK, w_TK, keep_TK=None):
    """Per-token, per-k loop: out[t] = sum_k w[t,k] * expert(ids[t,k])(x[t])."""
    slot_of = {}
    for s, e in enumerate(experts.local_experts):
        slot_of.setdefault(e, s)
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(x_TD.shape[1])
        for k in range(ids_TK.shape[1]):
            if keep_TK is None or keep_TK[t, k]:
                acc = acc + w_TK[t, k] * expert_ref(experts, slot_of[int(ids_TK[t, k])], x_TD[t])
        rows.append(acc)
    return torch.stack(rows)


def random_routing(T, E, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w_TK = torch.rand(T, K, generator=g).softmax(-1)
    return ids_TK, w_TK


def run_both(local_experts, E, K, T, cf=0.0, seed=0):
    experts = GroupedExperts(local_experts, D, FF, seed=3, layer_index=0, init_std=0.3)
    disp = LocalDispatcher(local_experts, E, cf)
    ids_TK, w0_TK = random_routing(T, E, K, seed)
    x0_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    grads = []
    outs = []
    for fast in (True, False):
        experts.zero_grad(set_to_none=True)
        x_TD, w_TK = x0_TD.clone().requires_grad_(), w0_TK.clone().requires_grad_()
        if fast:
            x_ND, meta = disp.dispatch(x_TD, ids_TK, w_TK)
            out = disp.combine(experts(x_ND, meta.tokens_per_slot), meta)
        else:
            keep = capacity_keep_mask(ids_TK, E, expert_capacity(T, K, E, cf)) if cf > 0 else None
            out = naive_moe(experts, x_TD, ids_TK, w_TK, keep)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        outs.append(out.detach())
        grads.append([x_TD.grad, w_TK.grad] + [p.grad.clone() for p in experts.parameters()])
    return outs, grads, experts, disp, ids_TK


@pytest.mark.parametrize("local_experts", [[0, 1, 2, 3], [3, 0, 2, 1], [2, 0, 1, 3, 0]])
def test_dropless_matches_naive_loop_values_and_grads(local_experts):
    (fast, ref), (g_fast, g_ref), *_ = run_both(local_experts, E=4, K=2, T=20)
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_replica_slot_gets_no_tokens_and_zero_grad():
    (_, _), (g_fast, _), experts, disp, ids = run_both([0, 1, 2, 3, 1], E=4, K=2, T=20)
    x_ND, meta = disp.dispatch(torch.randn(20, D), ids, torch.ones(20, 2))
    assert meta.tokens_per_slot[4] == 0
    assert meta.tokens_per_slot[:4] == torch.bincount(ids.flatten(), minlength=4).tolist()
    assert x_ND.shape == (40, D)
    w_gate_grad = g_fast[2]
    assert (w_gate_grad[4] == 0).all() and (w_gate_grad[1] != 0).any()


def test_rows_grouped_by_slot_in_token_order():
    disp = LocalDispatcher([2, 0, 1], 3, 0.0)
    ids_TK = torch.tensor([[0, 1], [2, 0], [1, 2]])
    x_TD = torch.arange(3.0).unsqueeze(1)
    x_ND, meta = disp.dispatch(x_TD, ids_TK, torch.ones(3, 2))
    # slot 0 = expert 2: tokens 1, 2; slot 1 = expert 0: tokens 0, 1; slot 2 = expert 1: tokens 0, 2
    assert x_ND.squeeze(1).tolist() == [1, 2, 0, 1, 0, 2]
    assert meta.tokens_per_slot == [2, 2, 2] and meta.num_dropped == 0


def test_capacity_drops_later_tokens_of_a_full_expert():
    experts = GroupedExperts([0, 1, 2], D, FF, seed=0, layer_index=0, init_std=0.3)
    disp = LocalDispatcher([0, 1, 2], 3, capacity_factor=1.0)  # capacity = ceil(6 * 1 / 3) = 2
    x_TD = torch.randn(6, D)
    ids_TK = torch.zeros(6, 1, dtype=torch.long)
    w_TK = torch.full((6, 1), 0.5)
    x_ND, meta = disp.dispatch(x_TD, ids_TK, w_TK)
    assert meta.num_dropped == 4 and meta.tokens_per_slot == [2, 0, 0]
    assert torch.equal(x_ND, x_TD[:2])
    out = disp.combine(experts(x_ND, meta.tokens_per_slot), meta)
    assert (out[2:] == 0).all()
    assert torch.allclose(out[:2], torch.stack([0.5 * expert_ref(experts, 0, x_TD[t]) for t in range(2)]), atol=1e-6)


def test_capacity_keep_mask_is_token_then_k_order():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1]])
    keep = capacity_keep_mask(ids_TK, 3, 2)
    assert keep.tolist() == [[True, True], [True, True], [False, True], [False, False]]
    assert capacity_keep_mask(ids_TK, 3, 10).all()
    assert not capacity_keep_mask(ids_TK, 3, 0).any()


def test_capacity_dropping_matches_naive_loop():
    (fast, ref), (g_fast, g_ref), _, disp, ids = run_both([0, 1, 2, 3], E=4, K=2, T=24, cf=0.75, seed=5)
    _, meta = disp.dispatch(torch.randn(24, D), ids, torch.ones(24, 2))
    assert meta.num_dropped > 0
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_expert_capacity_rule():
    assert expert_capacity(10, 2, 4, 0.0) is None
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 2, 4, 1.1) == 6  # ceil(5.5)


def test_meta_is_frozen_and_dispatcher_keeps_no_state():
    disp = LocalDispatcher([0, 1], 2, 0.0)
    assert isinstance(disp, Dispatcher)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(disp).items()}
    _, meta = disp.dispatch(torch.randn(4, D), torch.tensor([[0], [1], [1], [0]]), torch.ones(4, 1))
    assert isinstance(meta, DispatchMeta)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.num_dropped = 3
    assert vars(disp).keys() == state.keys()
    for k, v in vars(disp).items():
        assert torch.equal(v, state[k]) if isinstance(v, torch.Tensor) else v == state[k]


def test_local_dispatcher_needs_every_expert():
    with pytest.raises(ValueError, match=r"experts \[1, 3\]"):
        LocalDispatcher([0, 2], 4, 0.0)
