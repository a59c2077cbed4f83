"""Top-k token router of one MoE layer.

Owns: the linear gate, softmax scores, (optionally grouped) top-k selection, the aux-loss-free
selection bias buffer, and the frozen :class:`RouterOutput` every later stage consumes.

Shapes: T tokens, D model dim, E routed experts, K experts per token, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.config import MoEConfig, validate_moe
from moetrain.model.moe.dispatcher import SentRows
from moetrain.precision import fp32_compute


@dataclass(frozen=True)
class RouterOutput:
    """What the router decided for T tokens.

    logits_TE: float32 [T, E] gate logits (input of the z-loss).
    scores_TE: float32 [T, E] softmax(logits) (input of the load-balancing loss).
    topk_ids_TK: int64 [T, K] chosen experts, sorted by weight descending within a token.
    topk_weights_TK: float32 [T, K] the chosen (unbiased) scores, renormalised to sum 1 if
        ``moe.renormalize``.
    num_dropped: (token, expert) pairs dropped by the capacity rule; filled in by
        :class:`~moetrain.model.moe.layer.MoELayer` after dispatch (0 from the router itself).
    sent: rows the dispatch sent, by link (:class:`SentRows`, from the dispatch metadata); filled
        in by the layer as ``num_dropped``; None for a single-rank dispatch.
    """

    logits_TE: Tensor
    scores_TE: Tensor
    topk_ids_TK: Tensor
    topk_weights_TK: Tensor
    num_dropped: int = 0
    sent: SentRows | None = None


def select_topk(select_TE: Tensor, top_k: int, num_groups: int) -> Tensor:
    """Ids [T, K] of the top-k entries of ``select_TE``; with G groups of E/G contiguous experts,
    the top K/G of every group (MoGE). Order within a token is unspecified."""
    if num_groups == 1:
        return select_TE.topk(top_k, dim=-1, sorted=False).indices
    T, E = select_TE.shape
    per_group = E // num_groups
    local_TGk = select_TE.view(T, num_groups, per_group).topk(top_k // num_groups, dim=-1, sorted=False).indices
    offset_G1 = torch.arange(num_groups, device=select_TE.device).mul_(per_group).unsqueeze(-1)
    return (local_TGk + offset_G1).reshape(T, top_k)


def node_limited(select_TE: Tensor, node_E: Tensor, num_nodes: int, max_nodes: int, top_k: int) -> Tensor:
    """DeepSeek-V3's node-limited routing: ``select_TE`` with -inf outside each token's chosen nodes.

    A node's score for a token is the sum of its ``ceil(top_k / max_nodes)`` highest selection
    scores (fewer if it has fewer experts; a node with no expert is never chosen); the
    ``max_nodes`` best nodes are kept, so the top-k that follows picks experts on them only.
    ``node_E``: int64 [E] node of each expert. No-op when ``max_nodes >= num_nodes``."""
    if max_nodes >= num_nodes:
        return select_TE
    per = min(-(-top_k // max_nodes), select_TE.shape[1])
    member_GE = node_E.unsqueeze(0) == torch.arange(num_nodes, device=node_E.device).unsqueeze(1)
    masked_TGE = select_TE.unsqueeze(1).masked_fill(~member_GE, float("-inf"))
    best_TGj = masked_TGE.topk(per, dim=-1).values
    score_TG = torch.where(torch.isinf(best_TGj), 0.0, best_TGj).sum(-1)
    score_TG = score_TG.masked_fill(~member_GE.any(1), float("-inf"))
    chosen_TG = torch.zeros_like(score_TG, dtype=torch.bool).scatter_(1, score_TG.topk(max_nodes, dim=-1).indices, True)
    allowed_TE = chosen_TG.gather(1, node_E.unsqueeze(0).expand(select_TE.shape[0], -1))
    return select_TE.masked_fill(~allowed_TE, float("-inf"))


class TopKRouter(nn.Module):
    """Linear gate (no bias) -> float32 logits -> softmax -> top-k.

    ``moe.router``: ``softmax_topk`` weights are the chosen softmax scores (renormalised to sum
    1 when ``moe.renormalize``); ``topk_softmax`` (Mixtral) weights are the softmax over the k
    chosen logits (always sum 1; ``renormalize`` has no effect). Both select the same experts
    (softmax is monotonic); ``scores_TE`` is the softmax over all E in both.

    ``expert_bias_E`` (a float32 buffer, zeros) is added to the scores for *selection only* when
    ``moe.expert_bias`` is set (aux-loss-free balancing, DeepSeek-V3); the weights always come
    from the unbiased scores. The caller owns the bias update (e.g. an optimizer pre-hook).
    The gate weight ``gate_ED`` is a dense parameter created as zeros (uniform scores): the owning
    model initialises it (``transformer.init_dense_``).
    With ``top_k == 1`` and ``renormalize`` the weight is always 1, so the LM loss sends no
    gradient to the gate (only the auxiliary losses train it).

    ``moe.max_nodes_per_token`` M > 0: the node-limited rule (:func:`node_limited`) on the node of
    each expert, ``expert_node_E`` (a non-persistent int64 buffer, all 0 = one node: no limit),
    set from the run's placement and rank -> node map with :meth:`set_expert_nodes` by whoever
    knows them (the trainer; a one-process reference sets the multi-node run's map itself).
    """

    def __init__(self, dim: int, moe_cfg: MoEConfig) -> None:
        super().__init__()
        validate_moe(moe_cfg)
        self.num_experts = moe_cfg.num_experts
        self.top_k = moe_cfg.top_k
        self.num_groups = moe_cfg.num_groups
        self.renormalize = moe_cfg.renormalize
        self.softmax_over_k = moe_cfg.router == "topk_softmax"
        self.use_bias = moe_cfg.expert_bias
        self.gate_ED = nn.Parameter(torch.zeros(moe_cfg.num_experts, dim))
        self.expert_bias_E: torch.Tensor
        self.expert_node_E: torch.Tensor
        self.register_buffer("expert_bias_E", torch.zeros(moe_cfg.num_experts, dtype=torch.float32))
        self.max_nodes = moe_cfg.max_nodes_per_token
        self.num_nodes = 1
        self.register_buffer("expert_node_E", torch.zeros(moe_cfg.num_experts, dtype=torch.int64), persistent=False)

    def set_expert_nodes(self, node_E) -> None:
        """The node of each expert, [E] (nodes numbered 0..G-1), for node-limited routing."""
        node_E = torch.as_tensor(node_E, dtype=torch.int64)
        if node_E.shape != self.expert_node_E.shape or int(node_E.min()) < 0:
            raise ValueError(f"expert nodes must be {self.num_experts} node indices >= 0, got {node_E.tolist()}")
        counts = sorted(c for c in torch.bincount(node_E).tolist() if c > 0)
        if self.max_nodes and len(counts) > self.max_nodes and sum(counts[: self.max_nodes]) < self.top_k:
            raise ValueError(
                f"model.moe.max_nodes_per_token ({self.max_nodes}): the {self.max_nodes} node(s) with "
                f"fewest experts hold {sum(counts[: self.max_nodes])} < top_k ({self.top_k}) experts"
            )
        self.expert_node_E.copy_(node_E.to(self.expert_node_E.device))
        self.num_nodes = int(node_E.max()) + 1

    @fp32_compute  # logits, softmax, top-k and weights in fp32 even under a bf16 autocast
    def forward(self, x_TD: Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TD.float(), self.gate_ED.float())
        scores_TE = logits_TE.softmax(dim=-1)
        select_TE = scores_TE.detach()
        if self.use_bias:
            select_TE = select_TE + self.expert_bias_E
        if self.max_nodes:
            select_TE = node_limited(select_TE, self.expert_node_E, self.num_nodes, self.max_nodes, self.top_k)
        ids_TK = select_topk(select_TE, self.top_k, self.num_groups)
        weights_TK = scores_TE.gather(1, ids_TK)
        weights_TK, order_TK = weights_TK.sort(dim=-1, descending=True, stable=True)
        ids_TK = ids_TK.gather(1, order_TK)
        if self.softmax_over_k:
            weights_TK = logits_TE.gather(1, ids_TK).softmax(dim=-1)
        elif self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, scores_TE, ids_TK, weights_TK)
