"""Tests for moetrain.model.moe.experts and placement-independent expert initialisation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import GroupedExperts, Transformer
from placement.placement import Placement


def test_replicas_get_identical_init_and_distinct_experts_differ():
    ex = GroupedExperts([2, 5, 2], 8, 16, seed=7, layer_index=1, init_std=0.02)
    assert ex.local_experts == (2, 5, 2)
    assert ex.w_gate_SFD.shape == (3, 16, 8) and ex.w_down_SDF.shape == (3, 8, 16)
    for w in (ex.w_gate_SFD, ex.w_up_SFD, ex.w_down_SDF):
        assert torch.equal(w[0], w[2])
        assert not torch.equal(w[0], w[1])


def test_expert_init_depends_on_seed_layer_expert_only():
    a = GroupedExperts([0, 1, 2, 3], 8, 16, seed=7, layer_index=0, init_std=0.02)
    b = GroupedExperts([3, 1], 8, 16, seed=7, layer_index=0, init_std=0.02)
    c = GroupedExperts([3, 1], 8, 16, seed=7, layer_index=1, init_std=0.02)
    d = GroupedExperts([3, 1], 8, 16, seed=8, layer_index=0, init_std=0.02)
    assert torch.equal(b.w_up_SFD, a.w_up_SFD[[3, 1]])
    assert not torch.equal(c.w_up_SFD, b.w_up_SFD)
    assert not torch.equal(d.w_up_SFD, b.w_up_SFD)
    assert abs(a.w_gate_SFD.std().item() - 0.02) < 0.003


def test_forward_per_slot_matches_reference_and_handles_empty_slots():
    ex = GroupedExperts([0, 1, 2], 8, 16, seed=0, layer_index=0, init_std=0.2)
    x_ND = torch.randn(5, 8)
    y_ND = ex(x_ND, [3, 0, 2])
    for rows, slot in ((slice(0, 3), 0), (slice(3, 5), 2)):
        h = F.silu(x_ND[rows] @ ex.w_gate_SFD[slot].T) * (x_ND[rows] @ ex.w_up_SFD[slot].T)
        assert torch.allclose(y_ND[rows], h @ ex.w_down_SDF[slot].T, atol=1e-6)
    y_ND.sum().backward()
    assert (ex.w_gate_SFD.grad[1] == 0).all() and (ex.w_gate_SFD.grad[0] != 0).any()
    assert ex(torch.randn(0, 8), [0, 0, 0]).shape == (0, 8)
    with pytest.raises(ValueError, match="tokens_per_slot"):
        ex(x_ND, [5, 0])


def test_global_rng_untouched_by_model_init():
    state = torch.get_rng_state()
    Transformer(ModelConfig(vocab_size=64, dim=16, n_heads=2, ffn_dim=32,
                            moe=MoEConfig(num_experts=4, expert_ffn_dim=8)), seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_rank_with_experts_1_and_3_matches_single_process():
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, ffn_dim=32,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, num_shared_experts=1,
                                    first_moe_layer=1))
    full = Transformer(cfg, seed=11)
    placement = Placement(np.array([[0, 2, 1, 3], [2, 0, 3, 1]]), (2, 2), 4)
    rank1 = Transformer(cfg, seed=11, placement=placement, rank=1)
    assert rank1.num_moe_layers == full.num_moe_layers == 2
    assert [m.experts.local_experts for m in rank1.moe_layers()] == [(1, 3), (3, 1)]
    for layer, (lf, lr) in enumerate(zip(full.moe_layers(), rank1.moe_layers())):
        for name in ("w_gate_SFD", "w_up_SFD", "w_down_SDF"):
            assert torch.equal(getattr(lr.experts, name), getattr(lf.experts, name)[list(lr.experts.local_experts)])
    dense_full, dense_r1 = dict(full.dense_parameters()), dict(rank1.dense_parameters())
    assert dense_full.keys() == dense_r1.keys()
    for name, p in dense_full.items():
        assert torch.equal(p, dense_r1[name]), name
    assert rank1.moe_layers()[0].dispatcher is None  # holds 2 of 4 experts: needs an EP dispatcher
    with pytest.raises(RuntimeError, match="dispatcher"):
        rank1(torch.zeros(1, 4, dtype=torch.long))
