"""Token dispatch and combine for one MoE layer: the `Dispatcher` protocol and its single-rank
implementation.

Owns: the protocol every dispatcher implements (dispatch returns rows grouped by local slot plus
frozen metadata; combine takes both back; nothing is stored on ``self`` between the phases), the
capacity (token dropping) rule shared by all dispatchers, and :class:`LocalDispatcher` for a
rank that holds every expert.

Shapes: T tokens, D model dim, K experts per token, E logical experts, S local slots,
P = T * K (token, k) pairs, N rows routed to this rank's slots (after dropping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from moetrain.precision import to_compute


@dataclass(frozen=True)
class SentRows:
    """Rows one dispatch call sent from this rank, by where they went (python ints, from the
    splits the dispatcher already read in its one host sync): ``local`` stayed on this rank,
    ``intra`` went to other ranks of this node, ``inter`` to ranks of other nodes."""

    local: int = 0
    intra: int = 0
    inter: int = 0

    @property
    def offrank(self) -> int:
        return self.intra + self.inter

    @classmethod
    def from_splits(cls, rows_R: Sequence[int], rank: int, link_R: Sequence[int]) -> "SentRows":
        """``rows_R[r]`` rows to rank r; ``link_R[r]`` 0 = same node, 1 = another node."""
        intra = sum(int(n) for r, n in enumerate(rows_R) if r != rank and not link_R[r])
        inter = sum(int(n) for r, n in enumerate(rows_R) if link_R[r])
        return cls(int(rows_R[rank]), intra, inter)


@dataclass(frozen=True)
class DispatchMeta:
    """What every dispatcher reports: rows per local slot (slot order) and dropped pairs.
    Dispatchers subclass this with whatever their ``combine`` needs."""

    tokens_per_slot: list[int]
    num_dropped: int

    def sent_rows(self) -> SentRows | None:
        """What this dispatch sent off-rank (:class:`SentRows`); None for a single-rank dispatch."""
        return None


@dataclass(frozen=True)
class LocalDispatchMeta(DispatchMeta):
    """token_index_N: int64 [N] source token of each dispatched row; weights_N: [N] its top-k
    weight (carries the router's autograd graph); num_tokens: T."""

    token_index_N: Tensor
    weights_N: Tensor
    num_tokens: int


@runtime_checkable
class Dispatcher(Protocol):
    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor) -> tuple[Tensor, DispatchMeta]:
        """Returns x_ND: token rows grouped by LOCAL SLOT in slot order (N = rows routed to this
        rank's slots), and frozen metadata."""
        ...

    def combine(self, y_ND: Tensor, meta: DispatchMeta) -> Tensor:
        """out_TD = sum_k w_TK * expert_k(x_T) (dropped pairs contribute 0)."""
        ...


def dispatch_compute_combine(
    dispatcher: Dispatcher, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, experts
) -> tuple[Tensor, DispatchMeta]:
    """out_TD = combine(experts(dispatch(x_TD))) with ``experts(x_ND, tokens_per_slot)``. A
    dispatcher with a ``run`` method (the expert-parallel one, which can pipeline chunks of
    tokens so transfers overlap expert compute) does the three phases itself."""
    run = getattr(dispatcher, "run", None)
    if run is not None:
        return run(x_TD, topk_ids_TK, topk_weights_TK, experts)
    x_ND, meta = dispatcher.dispatch(x_TD, topk_ids_TK, topk_weights_TK)
    return dispatcher.combine(experts(x_ND, meta.tokens_per_slot), meta), meta


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int | None:
    """ceil(cf * T * K / E) (token, k) pairs per expert, or None (dropless) when cf <= 0.

    T is the tokens of one dispatch call: under expert parallelism one source rank's micro-batch,
    so the capacity is per source rank (see ``moetrain.parallel.dispatcher``)."""
    if capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def count_ids(ids: Tensor, n: int) -> Tensor:
    """int64 [n]: occurrences of each value 0..n-1 in ``ids`` (all of them must lie there).
    ``torch.bincount`` without its host reads: on CUDA bincount reads ``ids.min()`` and
    ``ids.max()`` to check and size its output; a scatter-add into a fixed size reads nothing."""
    flat = ids.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def capacity_keep_mask(topk_ids_TK: Tensor, num_experts: int, capacity: int) -> Tensor:
    """bool [T, K]: keep the first ``capacity`` (token, k) pairs of every expert, in row-major
    (token, then k) order; the rest are dropped. O(P log P), nothing of size [P, E]."""
    flat_P = topk_ids_TK.reshape(-1)
    P = flat_P.numel()
    sorted_P, order_P = torch.sort(flat_P, stable=True)
    counts_E = count_ids(flat_P, num_experts)
    group_start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert_sorted_P = torch.arange(P, device=flat_P.device) - group_start_E[sorted_P]
    rank_in_expert_P = torch.empty_like(rank_in_expert_sorted_P).scatter_(0, order_P, rank_in_expert_sorted_P)
    return (rank_in_expert_P < capacity).view_as(topk_ids_TK)


def weighted_combine(y_ND: Tensor, token_index_N: Tensor, weights_N: Tensor, num_tokens: int) -> Tensor:
    """out_TD[t] = sum over rows n with token_index_N[n] == t of weights_N[n] * y_ND[n].
    Differentiable in y and in the weights; tokens with no rows get zeros."""
    out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
    return out_TD.index_add(0, token_index_N, y_ND * weights_N.to(y_ND.dtype).unsqueeze(-1))


class LocalDispatcher:
    """Single-rank dispatcher: logical expert -> its first local slot; (token, k) pairs stably
    sorted by slot, so rows of a slot keep token order. Replica slots beyond the first receive
    no rows. Holds only immutable routing tables; no per-step state."""

    def __init__(self, local_experts: Sequence[int], num_experts: int, capacity_factor: float) -> None:
        experts = [int(e) for e in local_experts]
        missing = sorted(set(range(num_experts)) - set(experts))
        if missing:
            raise ValueError(
                f"LocalDispatcher needs every expert on this rank; experts {missing} have no "
                f"local slot (local_experts={experts}); use an expert-parallel dispatcher"
            )
        slot_of_E = torch.full((num_experts,), -1, dtype=torch.int64)
        for slot in reversed(range(len(experts))):
            slot_of_E[experts[slot]] = slot
        self.slot_of_E = slot_of_E
        self.num_slots = len(experts)
        self.num_experts = num_experts
        self.capacity_factor = float(capacity_factor)

    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor) -> tuple[Tensor, LocalDispatchMeta]:
        x_TD = to_compute(x_TD)  # rows in the compute dtype, as the expert-parallel dispatcher sends them
        T, K = topk_ids_TK.shape
        pair_P = torch.arange(T * K, device=x_TD.device)
        capacity = expert_capacity(T, K, self.num_experts, self.capacity_factor)
        num_dropped = 0
        if capacity is not None:
            keep_P = capacity_keep_mask(topk_ids_TK, self.num_experts, capacity).reshape(-1)
            pair_P = pair_P[keep_P]
            num_dropped = T * K - pair_P.numel()
        slot_P = self.slot_of_E.to(x_TD.device)[topk_ids_TK.reshape(-1)[pair_P]]
        slot_N, order_N = torch.sort(slot_P, stable=True)
        pair_N = pair_P[order_N]
        token_index_N = pair_N // K
        tokens_per_slot = torch.bincount(slot_N, minlength=self.num_slots).tolist()
        meta = LocalDispatchMeta(
            tokens_per_slot=tokens_per_slot,
            num_dropped=num_dropped,
            token_index_N=token_index_N,
            weights_N=topk_weights_TK.reshape(-1)[pair_N],
            num_tokens=T,
        )
        return x_TD.index_select(0, token_index_N), meta

    def combine(self, y_ND: Tensor, meta: DispatchMeta) -> Tensor:
        if not isinstance(meta, LocalDispatchMeta):
            raise TypeError(
                f"LocalDispatcher.combine needs the LocalDispatchMeta from its dispatch, got {type(meta).__name__}"
            )
        return weighted_combine(y_ND, meta.token_index_N, meta.weights_N, meta.num_tokens)
