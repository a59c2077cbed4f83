"""All-to-all token dispatcher for expert parallelism.

Owns: moving token rows from the rank that routed them to the ranks whose slots hold the chosen
experts, and the weighted results back — with uneven splits, optional dedup, optional capacity
dropping, and a correct backward. Implements the ``Dispatcher`` protocol of
``moetrain.model.moe.dispatcher``; returns frozen metadata and keeps no state between phases.

Legend: T local tokens, K top-k, D model dim, R ranks, U units sent by this rank, V units received,
N (unit, k) pairs received = rows handed to the local experts, S local slots.

A *unit* is what travels: with ``dedup`` one unit per (token, destination rank) — a token whose
k experts share a rank is sent there **once** and fanned out locally; without dedup one unit per
(token, k) pair. Each unit carries its row ``x_D`` plus a K-wide vector of routing weights (zero
where that k does not go to this rank) in one autograd all-to-all, and a K-wide int vector of
destination local slots (-1 where not) in a metadata all-to-all. The destination computes its
experts, forms the weighted sum per unit, and returns one row per unit.

Replicas: the expert chosen by (source rank r, expert e) goes to r's own slot if r holds e, else
to holder slot number ``r mod replicas`` — deterministic, and spreads sources over replicas.

Capacity (``capacity_factor`` cf > 0) is decided **per source rank**, before anything is sent:
this rank keeps, for every expert, the first ``ceil(cf * T * K / E)`` of its *own* (token, k)
pairs (T = this rank's tokens in this micro-batch, token order) and drops the rest. No
collective is needed, but an expert may receive up to R times that many rows in all, and the
dropped tokens differ from those one process would drop on the R ranks' concatenated tokens.
One process reproduces it exactly when each of its micro-batches holds one rank's tokens
(tests/parallel/test_capacity.py, test_equivalence.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from moetrain.model.moe.dispatcher import capacity_keep_mask, expert_capacity
from moetrain.parallel.context import ParallelContext
from moetrain.precision import to_compute
from placement.placement import Placement


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _all_to_all_ints(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def route_table(placement: Placement, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Destination of (source rank, expert): ``(dest_rank_RE, dest_local_slot_RE)``."""
    R, E = placement.num_ranks, placement.num_experts
    slot_rank = placement.slot_rank_S
    offsets = placement.slot_offset_R
    dest_rank = np.empty((R, E), dtype=np.int64)
    dest_slot = np.empty((R, E), dtype=np.int64)
    for e in range(E):
        slots = placement.log2phy(layer, e)
        for r in range(R):
            own = slots[slot_rank[slots] == r]
            s = int(own[0]) if own.size else int(slots[r % slots.size])
            dest_rank[r, e] = slot_rank[s]
            dest_slot[r, e] = s - offsets[slot_rank[s]]
    return dest_rank, dest_slot


@dataclass(frozen=True)
class EPDispatchMeta:
    tokens_per_slot: list[int]
    num_dropped: int
    send_splits: list[int]  # units sent to each rank
    recv_splits: list[int]  # units received from each rank
    unit_token_U: torch.Tensor  # local token index of each sent unit
    pair_unit_N: torch.Tensor  # received unit of each expert row (slot order)
    weight_N: torch.Tensor  # routing weight of each expert row (autograd)
    num_recv_units: int
    num_tokens: int


class AllToAllDispatcher:
    """Expert-parallel dispatcher of one MoE layer on one rank (see module docstring)."""

    def __init__(self, placement: Placement, layer: int, ctx: ParallelContext, *,
                 capacity_factor: float = 0.0, dedup: bool = True):
        self.ctx = ctx
        self.num_experts = placement.num_experts
        self.num_ranks = placement.num_ranks
        self.num_local_slots = placement.slots_per_rank[ctx.rank]
        self.capacity_factor = capacity_factor
        self.dedup = dedup
        dest_rank, dest_slot = route_table(placement, layer)
        self._dest_rank_E = torch.from_numpy(dest_rank[ctx.rank]).to(ctx.device)
        self._dest_slot_E = torch.from_numpy(dest_slot[ctx.rank]).to(ctx.device)

    # ---- dispatch -------------------------------------------------------------------------
    def _units(self, topk_ids_TK: torch.Tensor, keep_TK: torch.Tensor):
        """Group kept (token, k) pairs into units; returns unit (token, rank) and pair->unit."""
        T, K = topk_ids_TK.shape
        dest_rank_TK = self._dest_rank_E[topk_ids_TK]
        tok_TK = torch.arange(T, device=topk_ids_TK.device).unsqueeze(1).expand(T, K)
        if self.dedup:
            key = (dest_rank_TK * T + tok_TK)[keep_TK]  # sort by destination, then token
            unit_key, pair_unit = torch.unique(key, sorted=True, return_inverse=True)
            unit_rank, unit_token = unit_key // T, unit_key % T
        else:
            key = (dest_rank_TK * (T * K) + tok_TK * K + torch.arange(K, device=tok_TK.device).expand(T, K))[keep_TK]
            order = torch.argsort(key, stable=True)
            pair_unit = torch.empty_like(order)
            pair_unit[order] = torch.arange(order.numel())
            unit_key = key[order]
            unit_rank, unit_token = unit_key // (T * K), (unit_key % (T * K)) // K
        return unit_rank, unit_token, pair_unit

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor):
        x_TD = to_compute(x_TD)  # bf16 payloads (rows and weights) both ways under a bf16 autocast
        T, K = topk_ids_TK.shape
        R, D = self.num_ranks, x_TD.shape[1]
        group = self.ctx.group
        keep_TK = torch.ones_like(topk_ids_TK, dtype=torch.bool)
        cap = expert_capacity(T, K, self.num_experts, self.capacity_factor)
        if cap is not None:
            keep_TK = capacity_keep_mask(topk_ids_TK, self.num_experts, cap)
        num_dropped = int((~keep_TK).sum())
        unit_rank, unit_token, pair_unit = self._units(topk_ids_TK, keep_TK)
        U = unit_token.numel()

        # Per unit: K-wide weights (0 where the k goes elsewhere) and K-wide local slot ids (-1).
        dev = topk_ids_TK.device
        k_idx = torch.arange(K, device=dev).expand(T, K)[keep_TK]
        slot_UK = torch.full((U, K), -1, dtype=torch.int64, device=dev)
        slot_UK[pair_unit, k_idx] = self._dest_slot_E[topk_ids_TK[keep_TK]]
        w_UK = topk_weights_TK.new_zeros((U, K)).index_put((pair_unit, k_idx), topk_weights_TK[keep_TK])

        send_splits = torch.bincount(unit_rank, minlength=R)
        recv_splits = torch.empty_like(send_splits)
        dist.all_to_all_single(recv_splits, send_splits, group=group)
        send, recv = send_splits.tolist(), recv_splits.tolist()

        payload_UX = torch.cat([x_TD[unit_token], w_UK.to(x_TD.dtype)], dim=1)
        recv_VX = all_to_all(payload_UX, recv, send, group)
        slot_VK = _all_to_all_ints(slot_UK, recv, send, group)

        # Fan out received units to local slots; rows grouped by slot (stable: by source, token).
        v_idx, k_sel = torch.nonzero(slot_VK >= 0, as_tuple=True)
        slot_N = slot_VK[v_idx, k_sel]
        order = torch.argsort(slot_N, stable=True)
        pair_unit_N, k_N = v_idx[order], k_sel[order]
        x_ND = recv_VX[pair_unit_N, :D]
        weight_N = recv_VX[pair_unit_N, D + k_N]
        tokens_per_slot = torch.bincount(slot_N, minlength=self.num_local_slots).tolist()
        meta = EPDispatchMeta(tokens_per_slot=tokens_per_slot, num_dropped=num_dropped,
                              send_splits=send, recv_splits=recv, unit_token_U=unit_token,
                              pair_unit_N=pair_unit_N, weight_N=weight_N,
                              num_recv_units=recv_VX.shape[0], num_tokens=T)
        return x_ND, meta

    # ---- combine --------------------------------------------------------------------------
    def combine(self, y_ND: torch.Tensor, meta: EPDispatchMeta) -> torch.Tensor:
        D = y_ND.shape[1]
        weighted = y_ND * meta.weight_N.unsqueeze(1).to(y_ND.dtype)
        y_VD = y_ND.new_zeros((meta.num_recv_units, D)).index_add(0, meta.pair_unit_N, weighted)
        y_UD = all_to_all(y_VD, meta.send_splits, meta.recv_splits, self.ctx.group)
        return y_UD.new_zeros((meta.num_tokens, D)).index_add(0, meta.unit_token_U, y_UD)

    def sent_rows(self, meta: EPDispatchMeta) -> dict[str, int]:
        """Rows this rank sent to other ranks / kept local in the last dispatch (for metrics)."""
        local = meta.send_splits[self.ctx.rank]
        return {"sent_remote": sum(meta.send_splits) - local, "sent_local": local}


@torch.no_grad()
def count_unit_sends(topk_ids_TK: torch.Tensor, dispatcher: AllToAllDispatcher) -> int:
    """Rows this rank would send to *other* ranks for ``topk_ids_TK`` (dedup-aware, no capacity)."""
    T, K = topk_ids_TK.shape
    dest_TK = dispatcher._dest_rank_E[topk_ids_TK]
    remote_TK = dest_TK != dispatcher.ctx.rank
    if not dispatcher.dedup:
        return int(remote_TK.sum())
    R = dispatcher.num_ranks
    hit_TR = torch.zeros(T, R, dtype=torch.bool, device=topk_ids_TK.device)
    hit_TR.scatter_(1, dest_TK, True)
    hit_TR[:, dispatcher.ctx.rank] = False
    return int(hit_TR.sum())
