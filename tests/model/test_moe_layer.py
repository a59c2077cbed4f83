"""Tests for moetrain.model.moe.layer (route, dispatch, compute, combine + shared experts)."""

import torch

from moetrain.config import MoEConfig
from moetrain.model import MoELayer
from moetrain.model.moe.dispatcher import LocalDispatcher
from moetrain.model.transformer import init_dense_


def make_layer(**moe_kwargs):
    cfg = MoEConfig(**moe_kwargs)
    layer = MoELayer(16, cfg, layer_index=0, seed=0, local_experts=range(cfg.num_experts), init_std=0.1)
    dense = [(n, p) for n, p in layer.named_parameters() if not n.startswith("experts.")]
    init_dense_(dense, seed=1, init_std=0.1, out_std=0.1)
    return layer


def test_forward_shapes_and_routing():
    layer = make_layer(num_experts=4, top_k=2, expert_ffn_dim=8)
    out_BTD, route = layer(torch.randn(2, 5, 16))
    assert out_BTD.shape == (2, 5, 16)
    assert route.scores_TE.shape == (10, 4) and route.topk_ids_TK.shape == (10, 2)
    assert route.num_dropped == 0
    assert isinstance(layer.dispatcher, LocalDispatcher)
    assert "dispatcher" not in dict(layer.named_children())


def test_shared_experts_always_applied_even_to_dropped_tokens():
    layer = make_layer(num_experts=4, top_k=1, expert_ffn_dim=8, num_shared_experts=2, capacity_factor=0.25)
    assert layer.shared.w_up_FD.shape == (16, 16)  # 2 shared x expert_ffn_dim 8
    x_BTD = torch.randn(1, 32, 16)
    out_BTD, route = layer(x_BTD)
    shared_TD = layer.shared(x_BTD[0])
    assert route.num_dropped > 0
    # a token is dropped iff it is past its expert's capacity (2 = ceil(0.25 * 32 / 4))
    ids = route.topk_ids_TK[:, 0]
    rank = torch.tensor([int((ids[:t] == ids[t]).sum()) for t in range(32)])
    dropped = rank >= 2
    assert int(dropped.sum()) == route.num_dropped
    assert torch.allclose(out_BTD[0][dropped], shared_TD[dropped], atol=1e-6)
    assert (shared_TD[dropped].abs() > 0).any()
    # kept tokens get routed + shared
    layer.shared, shared = None, layer.shared
    routed_only, _ = layer(x_BTD)
    assert torch.allclose(out_BTD[0][~dropped], routed_only[0][~dropped] + shared_TD[~dropped], atol=1e-6)


def test_swapping_the_dispatcher_is_a_plain_attribute():
    layer = make_layer(num_experts=4, top_k=2, expert_ffn_dim=8)
    calls = []

    class Recording(LocalDispatcher):
        def dispatch(self, x_TD, ids, w):
            calls.append(x_TD.shape[0])
            return super().dispatch(x_TD, ids, w)

    x = torch.randn(1, 6, 16)
    ref, _ = layer(x)
    layer.dispatcher = Recording(range(4), 4, 0.0)
    out, _ = layer(x)
    assert calls == [6] and torch.equal(out, ref)
