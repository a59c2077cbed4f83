"""Tests for moetrain.model.moe.router."""

import pytest
import torch

from moetrain.config import ConfigError, MoEConfig
from moetrain.model.moe.router import TopKRouter, select_topk


def make_router(dim=16, seed=0, **moe_kwargs):
    router = TopKRouter(dim, MoEConfig(**moe_kwargs))
    with torch.no_grad():
        router.gate_ED.copy_(torch.randn(router.gate_ED.shape, generator=torch.Generator().manual_seed(seed)))
    return router


def tokens(T=64, dim=16, seed=1):
    return torch.randn(T, dim, generator=torch.Generator().manual_seed(seed))


def test_topk_ids_distinct_sorted_and_renormalised():
    router = make_router(num_experts=8, top_k=3)
    out = router(tokens())
    assert out.topk_ids_TK.shape == (64, 3)
    for row in out.topk_ids_TK.tolist():
        assert len(set(row)) == 3
    assert torch.allclose(out.topk_weights_TK.sum(-1), torch.ones(64))
    assert (out.topk_weights_TK[:, :-1] >= out.topk_weights_TK[:, 1:]).all()
    assert out.logits_TE.dtype == torch.float32
    assert torch.allclose(out.scores_TE, out.logits_TE.softmax(-1))
    # ungrouped, unbiased: the chosen experts are the k highest scores
    expected = out.scores_TE.topk(3, dim=-1).indices
    assert torch.equal(out.topk_ids_TK, expected)


def test_without_renormalise_weights_are_raw_scores():
    router = make_router(num_experts=8, top_k=2, renormalize=False)
    out = router(tokens())
    assert torch.equal(out.topk_weights_TK, out.scores_TE.gather(1, out.topk_ids_TK))
    assert (out.topk_weights_TK.sum(-1) < 1).all()


def test_grouped_routing_picks_k_over_g_per_group():
    router = make_router(num_experts=12, top_k=6, num_groups=3)
    out = router(tokens(T=50))
    group_TK = out.topk_ids_TK // 4
    for g in range(3):
        assert ((group_TK == g).sum(-1) == 2).all()
    # and within each group it takes that group's two best
    best = out.scores_TE.view(50, 3, 4).topk(2, dim=-1).indices + torch.arange(3).view(1, 3, 1) * 4
    assert torch.equal(out.topk_ids_TK.sort(-1).values, best.reshape(50, 6).sort(-1).values)


def test_grouped_selection_differs_from_global_topk():
    select_TE = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    assert sorted(select_topk(select_TE, 2, 1)[0].tolist()) == [0, 1]
    assert sorted(select_topk(select_TE, 2, 2)[0].tolist()) == [0, 3]


def test_expert_bias_changes_selection_not_weights():
    router = make_router(num_experts=8, top_k=2, expert_bias=True, renormalize=False)
    x = tokens()
    before = router(x)
    with torch.no_grad():
        router.expert_bias_E[5] = 10.0
    after = router(x)
    assert (after.topk_ids_TK == 5).any(-1).all()
    assert not torch.equal(before.topk_ids_TK, after.topk_ids_TK)
    assert torch.equal(after.scores_TE, before.scores_TE)
    assert torch.equal(after.topk_weights_TK, after.scores_TE.gather(1, after.topk_ids_TK))


def test_expert_bias_ignored_when_disabled():
    router = make_router(num_experts=8, top_k=2, expert_bias=False)
    x = tokens()
    before = router(x)
    with torch.no_grad():
        router.expert_bias_E[5] = 10.0
    assert torch.equal(router(x).topk_ids_TK, before.topk_ids_TK)


def test_gradients_reach_the_gate():
    router = make_router(num_experts=8, top_k=2)
    out = router(tokens())
    (out.topk_weights_TK[:, 0].sum() + out.scores_TE[:, 3].sum()).backward()
    assert router.gate_ED.grad is not None and router.gate_ED.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=4, top_k=5), "model.moe.top_k"),
    (dict(num_experts=8, top_k=2, num_groups=3), "model.moe.num_groups"),
    (dict(num_experts=8, top_k=3, num_groups=2), "model.moe.num_groups"),
    (dict(num_experts=0, top_k=1), "model.moe.num_experts"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TopKRouter(16, MoEConfig(**kwargs))
