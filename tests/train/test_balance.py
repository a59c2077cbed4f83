"""LoadBalancer (moetrain/train/balance.py) against hand-computed values: every LBL scope,
the per-step reset of the global counts, the layer convention, the z-loss and the
aux-loss-free bias update. The global scope's all-reduce runs on a real 2-process gloo group.

All routing below uses E = 4 experts, top-1, T = 4 tokens per micro-batch, and every token of a
micro-batch has the same router probabilities, so p_i is that row and f_i = count_i / T:

- micro-batch A: p = [0.4, 0.3, 0.2, 0.1], experts [0, 0, 1, 2] -> counts [2, 1, 1, 0]
  micro LBL = 4 * (0.5*0.4 + 0.25*0.3 + 0.25*0.2) = 1.3
- micro-batch B: q = [0.1, 0.1, 0.1, 0.7], experts [3, 3, 3, 3] -> counts [0, 0, 0, 4]
  micro LBL = 4 * 0.7 = 2.8
- A then B in one step, global scope: B sees the running counts [2, 1, 1, 4] over 8 tokens,
  f = [0.25, 0.125, 0.125, 0.5]: LBL = 4 * (0.025 + 0.0125 + 0.0125 + 0.35) = 1.6
  (without the per-step reset, a later step's B alone would see [2, 1, 1, 8] / 12: 2.0)
- on two ranks (rank 0: A, rank 1: B), global scope: f = [0.25, 0.125,
  0.125, 0.5] on both; rank 0 (p): 4 * (0.1 + 0.0375 + 0.025 + 0.05) = 0.85; rank 1 (q): 1.6.
  Their mean, 1.225, is the one-process LBL of the 8 tokens: p-bar = [0.25, 0.2, 0.15, 0.4],
  4 * (0.0625 + 0.025 + 0.01875 + 0.2) = 1.225.
"""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config import LossConfig, MoEConfig
from moetrain.model.moe.layer import MoELayer
from moetrain.model.moe.router import RouterOutput
from moetrain.parallel.context import ParallelContext
from moetrain.train.balance import LoadBalancer
from tests.gloo import run_gloo

E, K, T = 4, 1, 4
COEFF = 0.1
P_A = [0.4, 0.3, 0.2, 0.1]
IDS_A = [0, 0, 1, 2]
P_B = [0.1, 0.1, 0.1, 0.7]
IDS_B = [3, 3, 3, 3]


def routing(probs: list[float] | list[list[float]], ids: list[int]) -> RouterOutput:
    """A RouterOutput of T tokens: one probability row for all tokens, or one per token."""
    scores_TE = torch.tensor(probs, dtype=torch.float32).expand(len(ids), E).clone()
    ids_TK = torch.tensor(ids, dtype=torch.int64).view(-1, 1)
    return RouterOutput(logits_TE=scores_TE.log(), scores_TE=scores_TE, topk_ids_TK=ids_TK,
                        topk_weights_TK=torch.ones(len(ids), 1))


def balancer(scope: str, *, num_layers: int = 1, z: float = 0.0, ctx: ParallelContext | None = None,
             expert_bias: bool = False, lbl: float = COEFF) -> LoadBalancer:
    return LoadBalancer(LossConfig(lbl_coeff=lbl, lbl_scope=scope, z_loss_coeff=z),
                        MoEConfig(num_experts=E, top_k=K, expert_bias=expert_bias, bias_update_rate=0.01),
                        num_layers, ctx or ParallelContext())


def test_micro_scope_by_hand():
    b = balancer("micro")
    b.start_step()
    lbl_a, zl = b.micro_losses([routing(P_A, IDS_A)], batch_size=1)
    lbl_b, _ = b.micro_losses([routing(P_B, IDS_B)], batch_size=1)
    assert math.isclose(lbl_a.item(), COEFF * 1.3, rel_tol=1e-6)
    assert math.isclose(lbl_b.item(), COEFF * 2.8, rel_tol=1e-6)  # B alone, not A's counts
    assert zl.item() == 0.0  # z-loss coefficient 0
    assert b.global_step_counts().tolist() == [[2.0, 1.0, 1.0, 4.0]]


def test_global_scope_accumulates_over_micro_batches_and_resets_each_step():
    b = balancer("global")
    b.start_step()
    lbl_a, _ = b.micro_losses([routing(P_A, IDS_A)], batch_size=1)
    lbl_b, _ = b.micro_losses([routing(P_B, IDS_B)], batch_size=1)
    assert math.isclose(lbl_a.item(), COEFF * 1.3, rel_tol=1e-6)  # running counts = A's
    assert math.isclose(lbl_b.item(), COEFF * 1.6, rel_tol=1e-6)  # running counts = A + B
    assert b.global_step_counts().tolist() == [[2.0, 1.0, 1.0, 4.0]]

    b.start_step()  # a new optimizer step forgets the last step's counts
    lbl_b2, _ = b.micro_losses([routing(P_B, IDS_B)], batch_size=1)
    assert math.isclose(lbl_b2.item(), COEFF * 2.8, rel_tol=1e-6), "global counts were not reset per step"
    assert b.global_step_counts().tolist() == [[0.0, 0.0, 0.0, 4.0]]


def test_sequence_scope_by_hand():
    """Two sequences of two tokens in one micro-batch. Sequence 0: p, experts [0, 0]:
    4 * 0.4 = 1.6. Sequence 1: r = [0.1, 0.2, 0.3, 0.4], experts [1, 2]: 4 * (0.5*0.2 + 0.5*0.3)
    = 1.0. Sequence LBL = mean = 1.3; the micro LBL of the same tokens is 4 * 0.25 * 1 = 1.0
    (mean probabilities uniform)."""
    probs = [P_A, P_A, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]
    r = routing(probs, [0, 0, 1, 2])
    seq = balancer("sequence")
    seq.start_step()
    assert math.isclose(seq.micro_losses([r], batch_size=2)[0].item(), COEFF * 1.3, rel_tol=1e-6)
    micro = balancer("micro")
    micro.start_step()
    assert math.isclose(micro.micro_losses([r], batch_size=2)[0].item(), COEFF * 1.0, rel_tol=1e-6)


def test_losses_are_summed_over_moe_layers():
    """Megatron's convention: each MoE layer adds its own coeff * LBL (and coeff * z-loss), so
    the pressure per layer does not shrink with depth. Layer 0: routing A (LBL 1.3), logits 0
    (z = log(4)^2). Layer 1: uniform counts (LBL 1.0 for any p), logits [log 3, 0, 0, 0]
    (z = log(6)^2)."""
    z = 1e-3
    b = balancer("micro", num_layers=2, z=z)
    b.start_step()
    layer0 = RouterOutput(logits_TE=torch.zeros(T, E), scores_TE=torch.tensor(P_A).expand(T, E),
                          topk_ids_TK=torch.tensor(IDS_A).view(T, 1), topk_weights_TK=torch.ones(T, 1))
    logits1 = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0]).expand(T, E)
    layer1 = RouterOutput(logits_TE=logits1, scores_TE=logits1.softmax(-1),
                          topk_ids_TK=torch.arange(T).view(T, 1), topk_weights_TK=torch.ones(T, 1))
    lbl, zl = b.micro_losses([layer0, layer1], batch_size=1)
    assert math.isclose(lbl.item(), COEFF * (1.3 + 1.0), rel_tol=1e-6)
    assert math.isclose(zl.item(), z * (math.log(4.0) ** 2 + math.log(6.0) ** 2), rel_tol=1e-6)
    assert b.global_step_counts().tolist() == [[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]


def test_lbl_gradient_pushes_probability_away_from_overloaded_experts():
    """d LBL / d p_ti = coeff * E * f_i / T: larger for the more loaded expert, 0 for an idle one."""
    b = balancer("micro")
    b.start_step()
    r = routing(P_A, IDS_A)
    scores = r.scores_TE.clone().requires_grad_(True)
    r = RouterOutput(r.logits_TE, scores, r.topk_ids_TK, r.topk_weights_TK)
    b.micro_losses([r], batch_size=1)[0].backward()
    expected = torch.tensor([0.5, 0.25, 0.25, 0.0]) * COEFF * E / T
    assert torch.allclose(scores.grad, expected.expand(T, E))


def _global_on_two_ranks(ctx: ParallelContext, scope: str) -> dict:
    """Rank 0 routes A then B, rank 1 routes B then A (two micro-batches), then a second step
    with one micro-batch each."""
    b = balancer(scope, ctx=ctx)
    first, second = ((P_A, IDS_A), (P_B, IDS_B)) if ctx.rank == 0 else ((P_B, IDS_B), (P_A, IDS_A))
    b.start_step()
    lbl1 = b.micro_losses([routing(*first)], batch_size=1)[0].item()
    lbl2 = b.micro_losses([routing(*second)], batch_size=1)[0].item()
    counts1 = b.global_step_counts().tolist()
    b.start_step()
    lbl3 = b.micro_losses([routing(*first)], batch_size=1)[0].item()
    counts2 = b.global_step_counts().tolist()
    return {"lbl": [lbl1, lbl2, lbl3], "counts": [counts1, counts2]}


@pytest.mark.parametrize("scope", ["global", "micro"])
def test_counts_over_two_gloo_ranks(scope):
    ranks = run_gloo(_global_on_two_ranks, 2, scope)
    # Either scope: the step's counts are the sum over ranks and micro-batches, reset each step.
    for r in ranks:
        assert r["counts"] == [[[4.0, 2.0, 2.0, 8.0]], [[2.0, 1.0, 1.0, 4.0]]]
    lbl = [[v / COEFF for v in r["lbl"]] for r in ranks]
    if scope == "global":  # f from both ranks' counts so far (see the module docstring)
        expected = [[0.85, 1.6, 0.85], [1.6, 0.85, 1.6]]
        assert math.isclose((lbl[0][0] + lbl[1][0]) / 2, 1.225, rel_tol=1e-6)  # = one process, 8 tokens
    else:  # each rank's own micro-batch only
        expected = [[1.3, 2.8, 1.3], [2.8, 1.3, 2.8]]
    for got, want in zip(lbl, expected):
        assert got == pytest.approx(want, rel=1e-6)


def _moe_layers(num_layers: int, expert_bias: bool) -> list[MoELayer]:
    cfg = MoEConfig(num_experts=E, top_k=2, expert_ffn_dim=4, expert_bias=expert_bias, bias_update_rate=0.01,
                    renormalize=False)
    return [MoELayer(8, cfg, layer_index=i, seed=0, local_experts=range(E), init_std=0.02)
            for i in range(num_layers)]


def test_bias_update_sign_and_size():
    """bias_i += rate * sign(mean(count) - count_i): layer 0 counts [4, 1, 3, 4] (mean 3) ->
    [-r, +r, 0, -r]; layer 1 balanced -> unchanged. A second update adds the same again."""
    layers = _moe_layers(2, expert_bias=True)
    b = balancer("global", num_layers=2, expert_bias=True)
    counts_LE = torch.tensor([[4.0, 1.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    b.update_bias(layers, counts_LE)
    assert layers[0].router.expert_bias_E.tolist() == pytest.approx([-0.01, 0.01, 0.0, -0.01])
    assert layers[1].router.expert_bias_E.tolist() == [0.0, 0.0, 0.0, 0.0]
    b.update_bias(layers, counts_LE)
    assert layers[0].router.expert_bias_E.tolist() == pytest.approx([-0.02, 0.02, 0.0, -0.02])


def test_bias_makes_the_underloaded_expert_selected_without_changing_weights():
    """With a zero gate (uniform scores 1/4), the bias after one update decides top-2 selection:
    expert 1 (+r) and expert 2 (0) beat experts 0 and 3 (-r) for every token; the weights stay the unbiased 1/4."""
    layers = _moe_layers(1, expert_bias=True)
    balancer("global", expert_bias=True).update_bias(layers, torch.tensor([[4.0, 1.0, 3.0, 4.0]]))
    with torch.no_grad():
        layers[0].router.gate_ED.zero_()
    out = layers[0].router(torch.randn(5, 8))
    assert all(sorted(ids) == [1, 2] for ids in out.topk_ids_TK.tolist())
    assert torch.allclose(out.topk_weights_TK, torch.full((5, 2), 0.25))


def test_no_bias_update_without_expert_bias():
    layers = _moe_layers(1, expert_bias=False)
    balancer("global").update_bias(layers, torch.tensor([[4.0, 1.0, 3.0, 4.0]]))
    assert layers[0].router.expert_bias_E.tolist() == [0.0, 0.0, 0.0, 0.0]
