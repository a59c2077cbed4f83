"""Tests for moetrain.losses (pure functions, values checked against hand computations)."""

import math

import torch
import torch.nn.functional as F

from moetrain.losses import (expert_counts, lm_loss, load_balancing_loss, sequence_load_balancing_loss,
                             z_loss)


def test_lbl_is_one_for_uniform_routing():
    T, E, K = 16, 8, 2
    scores_TE = torch.full((T, E), 1.0 / E)
    ids_TK = torch.arange(T * K).view(T, K) % E  # every expert gets T*K/E pairs
    counts_E = expert_counts(ids_TK, E)
    assert torch.equal(counts_E, torch.full((E,), T * K / E))
    assert math.isclose(load_balancing_loss(scores_TE, counts_E, T, K).item(), 1.0, rel_tol=1e-6)


def test_lbl_is_e_over_k_when_all_tokens_pick_the_same_k_experts():
    T, E, K = 10, 8, 2
    scores_TE = torch.zeros(T, E)
    scores_TE[:, :K] = 1.0 / K
    ids_TK = torch.arange(K).expand(T, K)
    loss = load_balancing_loss(scores_TE, expert_counts(ids_TK, E), T, K)
    assert math.isclose(loss.item(), E / K, rel_tol=1e-6)


def test_lbl_gradient_flows_to_scores_only():
    T, E, K = 6, 4, 2
    scores_TE = torch.rand(T, E).softmax(-1).requires_grad_()
    counts_E = torch.tensor([5.0, 3.0, 4.0, 0.0], requires_grad=True)
    load_balancing_loss(scores_TE, counts_E, T, K).backward()
    assert counts_E.grad is None
    expected = (E * counts_E.detach() / (T * K) / T).expand(T, E)  # d/dp_ti = E * f_i / T
    assert torch.allclose(scores_TE.grad, expected)


def test_lbl_with_global_counts():
    # counts from a 4x larger batch (the caller all-reduced them); p from the local scores
    scores_TE = torch.rand(5, 4).softmax(-1)
    counts_E = torch.tensor([10.0, 20.0, 5.0, 5.0])
    loss = load_balancing_loss(scores_TE, counts_E, 20, 2)
    assert math.isclose(loss.item(), 4 * float((counts_E / 40 * scores_TE.mean(0)).sum()), rel_tol=1e-6)


def test_sequence_lbl_equals_lbl_for_one_sequence_and_averages_sequences():
    g = torch.Generator().manual_seed(0)
    B, S, E, K = 3, 7, 6, 2
    scores_BSE = torch.rand(B, S, E, generator=g).softmax(-1)
    ids_BSK = scores_BSE.topk(K, dim=-1).indices
    per_seq = [load_balancing_loss(scores_BSE[b], expert_counts(ids_BSK[b], E), S, K) for b in range(B)]
    one = sequence_load_balancing_loss(scores_BSE[:1], ids_BSK[:1], E, K)
    assert torch.allclose(one, per_seq[0])
    assert torch.allclose(sequence_load_balancing_loss(scores_BSE, ids_BSK, E, K), torch.stack(per_seq).mean())


def test_z_loss_by_hand():
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert math.isclose(z_loss(logits_TE).item(), expected, rel_tol=1e-6)


def test_lm_loss_is_mean_cross_entropy():
    logits_BTV = torch.randn(2, 3, 5)
    targets_BT = torch.tensor([[0, 4, 2], [1, 1, 3]])
    logp = logits_BTV.log_softmax(-1)
    expected = -logp.gather(-1, targets_BT.unsqueeze(-1)).mean()
    assert torch.allclose(lm_loss(logits_BTV, targets_BT), expected)
    targets_BT[1, 2] = -100
    assert torch.allclose(lm_loss(logits_BTV, targets_BT), F.cross_entropy(logits_BTV[targets_BT != -100], targets_BT[targets_BT != -100]))


def test_expert_counts():
    ids_TK = torch.tensor([[0, 3], [3, 1], [3, 0]])
    counts = expert_counts(ids_TK, 5)
    assert counts.dtype == torch.float32
    assert counts.tolist() == [2.0, 1.0, 0.0, 3.0, 0.0]
