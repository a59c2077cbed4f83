"""Tests for the architecture options of issue #13: grouped-query attention, q/k norm, QKV bias,
router variants, shared-expert width and sigmoid gate. Each against a hand-computed result."""

import math

import torch

from moetrain.config import MoEConfig
from moetrain.model.attention import CausalSelfAttention, apply_rotary
from moetrain.model.moe.layer import MoELayer
from moetrain.model.moe.router import TopKRouter
from moetrain.model.transformer import init_dense_

D, H, T = 16, 4, 5


def naive_attention(x_TD, wq, wk, wv, wo, att, *, H, G, qn=None, kn=None):
    """Causal attention written out head by head (one sequence), the textbook formula."""
    d = D // H
    q, k, v = x_TD @ wq.T, x_TD @ wk.T, x_TD @ wv.T
    if qn is not None:
        q, k = qn(q), kn(k)
    cos, sin = att.rope_cos[:T], att.rope_sin[:T]
    heads = []
    for h in range(H):
        g = h // (H // G)
        qh = apply_rotary(q[:, h * d:(h + 1) * d][None], cos, sin)[0]
        kh = apply_rotary(k[:, g * d:(g + 1) * d][None], cos, sin)[0]
        s = qh @ kh.T / math.sqrt(d)
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        heads.append(s.softmax(-1) @ v[:, g * d:(g + 1) * d])
    return torch.cat(heads, -1) @ wo.T


def randomised(att):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return att


def test_grouped_query_attention_shares_each_kv_head_between_its_query_heads():
    att = randomised(CausalSelfAttention(D, H, 8, 10000.0, n_kv_heads=2))
    assert att.wqkv_QD.shape == ((4 + 2 * 2) * 4, D)
    wq, wk, wv = att.wqkv_QD.detach().split((16, 8, 8))
    x = torch.randn(1, T, D)
    want = naive_attention(x[0], wq, wk, wv, att.wo_DD.detach(), att, H=4, G=2)
    assert torch.allclose(att(x)[0], want, atol=1e-5)


def test_default_attention_is_the_fused_multi_head_path():
    att = randomised(CausalSelfAttention(D, H, 8, 10000.0))
    assert att.wqkv_QD.shape == (3 * D, D) and att.bqkv_Q is None and att.q_norm is None
    wq, wk, wv = att.wqkv_QD.detach().split((16, 16, 16))
    x = torch.randn(1, T, D)
    assert torch.allclose(att(x)[0], naive_attention(x[0], wq, wk, wv, att.wo_DD.detach(), att, H=4, G=4),
                          atol=1e-5)


def test_qk_norm_normalises_the_whole_query_and_key_projection_before_heads():
    att = randomised(CausalSelfAttention(D, H, 8, 10000.0, n_kv_heads=2, qk_norm=True, norm_eps=1e-6))
    assert att.q_norm.weight_D.shape == (16,) and att.k_norm.weight_D.shape == (8,)
    wq, wk, wv = att.wqkv_QD.detach().split((16, 8, 8))

    def rms(w):
        return lambda y: y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w.detach()
    x = torch.randn(1, T, D)
    want = naive_attention(x[0], wq, wk, wv, att.wo_DD.detach(), att, H=4, G=2,
                           qn=rms(att.q_norm.weight_D), kn=rms(att.k_norm.weight_D))
    assert torch.allclose(att(x)[0], want, atol=1e-5)


def test_a_value_bias_adds_wo_times_bias_to_every_position():
    """softmax rows sum to 1, so attn(v + b) = attn(v) + b: the output moves by wo @ b_v."""
    att = randomised(CausalSelfAttention(D, H, 8, 10000.0, qkv_bias=True))
    x = torch.randn(2, T, D)
    with torch.no_grad():
        att.bqkv_Q.zero_()
        base = att(x)
        att.bqkv_Q[2 * D:] = torch.arange(D, dtype=torch.float32)
        shifted = att(x)
    want = base + att.wo_DD.detach() @ torch.arange(D, dtype=torch.float32)
    assert torch.allclose(shifted, want, atol=1e-4)


def test_qkv_bias_is_initialised_to_zero_and_draws_nothing():
    att = CausalSelfAttention(D, H, 8, 10000.0, qkv_bias=True)
    plain = CausalSelfAttention(D, H, 8, 10000.0)
    init_dense_(att.named_parameters(), seed=1, init_std=0.1, out_std=0.1)
    init_dense_(plain.named_parameters(), seed=1, init_std=0.1, out_std=0.1)
    assert torch.equal(att.bqkv_Q, torch.zeros(3 * D))
    assert torch.equal(att.wqkv_QD, plain.wqkv_QD) and torch.equal(att.wo_DD, plain.wo_DD)


def router_with(logits_E, **kw):
    r = TopKRouter(4, MoEConfig(num_experts=4, top_k=2, **kw))
    with torch.no_grad():
        r.gate_ED.copy_(torch.diag(torch.ones(4)))
    return r(torch.tensor([logits_E]))


def test_topk_softmax_router_weights_are_the_softmax_over_the_chosen_logits():
    out = router_with([1.0, 2.0, 3.0, 0.0], router="topk_softmax")
    assert out.topk_ids_TK.tolist() == [[2, 1]]
    e = math.e
    assert torch.allclose(out.topk_weights_TK, torch.tensor([[e / (1 + e), 1 / (1 + e)]]))
    assert torch.allclose(out.scores_TE, torch.tensor([[1.0, 2.0, 3.0, 0.0]]).softmax(-1))


def test_softmax_topk_router_without_renormalisation_keeps_the_raw_scores():
    out = router_with([1.0, 2.0, 3.0, 0.0], router="softmax_topk", renormalize=False)
    z = math.e + math.e ** 2 + math.e ** 3 + 1
    assert out.topk_ids_TK.tolist() == [[2, 1]]
    assert torch.allclose(out.topk_weights_TK, torch.tensor([[math.e ** 3 / z, math.e ** 2 / z]]))


def make_layer(**kw):
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, **kw)
    layer = MoELayer(D, cfg, layer_index=0, seed=0, local_experts=range(4), init_std=0.1)
    init_dense_([(n, p) for n, p in layer.named_parameters() if not n.startswith("experts.")],
                seed=1, init_std=0.1, out_std=0.1)
    return layer


def test_shared_expert_width_follows_shared_expert_ffn_dim():
    assert make_layer(num_shared_experts=2, shared_expert_ffn_dim=6).shared.w_up_FD.shape == (12, D)
    assert make_layer(num_shared_experts=2).shared.w_up_FD.shape == (16, D)


def test_shared_expert_gate_scales_the_shared_output_by_sigmoid_of_x_dot_w():
    layer = make_layer(num_shared_experts=1, shared_expert_ffn_dim=6, shared_expert_gate=True)
    x = torch.randn(1, T, D)
    with torch.no_grad():
        layer.shared_gate_1D.zero_()  # sigmoid(0) = 1/2
        half, _ = layer(x)
        w = torch.randn(1, D)
        layer.shared_gate_1D.copy_(w)
        gated, _ = layer(x)
        shared = layer.shared(x[0])
    assert torch.allclose(gated[0] - half[0], (torch.sigmoid(x[0] @ w.T) - 0.5) * shared, atol=1e-6)
    layer.shared = None  # routed part alone
    routed, _ = layer(x)
    assert torch.allclose(half[0], routed[0] + 0.5 * shared, atol=1e-6)


def test_rmsnorm_normalises_a_bf16_input_in_fp32_and_returns_bf16():
    """A bf16 input (q/k norm under autocast) is normalised in fp32 then cast back: equal to the
    fp32 computation rounded once to bf16 (a bf16-internal reduction would differ)."""
    from moetrain.model.norm import RMSNorm

    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight_D.copy_(torch.linspace(0.5, 1.5, 64))
    x = (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    out = norm(x)
    want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight_D).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
