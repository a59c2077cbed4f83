"""Training losses, as pure functions: LM cross-entropy, load-balancing losses, router z-loss.

Owns: the formulas (in each docstring) and nothing else; which scope feeds which counts (micro,
global, sequence) is the training step's business.

Shapes: B batch, T tokens (or S per-sequence positions), V vocabulary, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lm_loss(logits_BTV: Tensor, targets_BT: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy: mean over non-ignored positions of -log softmax(logits)[target].

    logits_BTV: [B, T, V] (computed in float32); targets_BT: int64 [B, T]. Returns a scalar."""
    V = logits_BTV.shape[-1]
    return F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_BT.reshape(-1), ignore_index=ignore_index)


def expert_counts(topk_ids_TK: Tensor, num_experts: int) -> Tensor:
    """counts_E[i] = number of (token, k) pairs routed to expert i; float32 [E]. A scatter-add
    into E bins, not ``torch.bincount`` (which reads ``min()`` and ``max()`` to the host on CUDA)."""
    flat = topk_ids_TK.reshape(-1)
    return torch.zeros(num_experts, device=flat.device).scatter_add_(
        0, flat, torch.ones(flat.shape, device=flat.device)
    )


def routing_counts(topk_ids: list[Tensor], num_experts: int) -> Tensor:
    """counts_LE: float32 [L, E], :func:`expert_counts` of each MoE layer's ``topk_ids_TK`` —
    computed once per micro-batch, shared by the load balancer and the routing statistics."""
    return torch.stack([expert_counts(ids, num_experts) for ids in topk_ids])


def load_balancing_loss(scores_TE: Tensor, counts_E: Tensor, num_tokens: int | float | Tensor, top_k: int) -> Tensor:
    """Switch-style load-balancing loss, Megatron / DeepSpeed top-k convention::

        LBL = E * sum_i f_i * p_i,   f_i = counts_E[i] / (num_tokens * top_k),   p_i = mean_t scores_TE[t, i]

    f carries no gradient (counts are detached); p is differentiable. Uniform routing gives 1.0;
    every token sent to the same k experts, each with probability 1/k, gives E / k. HF's Mixtral
    helper (``load_balancing_loss_func``) is k times this value.

    ``counts_E`` / ``num_tokens`` may describe a larger batch than ``scores_TE`` (global-batch
    LBL: the caller all-reduces and accumulates the counts); ``p`` always uses the local scores.

    scores_TE: [T, E] softmax router probabilities; counts_E: [E]. Returns a float32 scalar.
    """
    E = scores_TE.shape[-1]
    f_E = counts_E.detach().to(torch.float32) / (num_tokens * top_k)
    p_E = scores_TE.to(torch.float32).mean(dim=0)
    return E * (f_E * p_E).sum()


def sequence_load_balancing_loss(scores_BSE: Tensor, topk_ids_BSK: Tensor, num_experts: int, top_k: int) -> Tensor:
    """Sequence-wise LBL (DeepSeek-V3): f and p per sequence, loss averaged over sequences::

        LBL = mean_b E * sum_i f_bi * p_bi,   f_bi = count_b(i) / (S * K),   p_bi = mean_s scores_BSE[b, s, i]

    With one sequence this equals :func:`load_balancing_loss` on that sequence.
    scores_BSE: [B, S, E]; topk_ids_BSK: int64 [B, S, K]. Returns a float32 scalar."""
    B, S, E = scores_BSE.shape
    if E != num_experts:
        raise ValueError(f"scores_BSE has {E} experts but num_experts is {num_experts}")
    ids_BP = topk_ids_BSK.reshape(B, -1)
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=scores_BSE.device)
    counts_BE.scatter_add_(1, ids_BP, torch.ones_like(ids_BP, dtype=torch.float32))
    f_BE = counts_BE / (S * top_k)
    p_BE = scores_BSE.to(torch.float32).mean(dim=1)
    return (E * (f_BE * p_BE).sum(dim=1)).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean_t (logsumexp_i logits_TE[t, i])^2. Returns a float32 scalar."""
    return torch.logsumexp(logits_TE.to(torch.float32), dim=-1).square().mean()
