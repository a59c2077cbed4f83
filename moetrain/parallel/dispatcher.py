"""All-to-all token dispatcher for expert parallelism.

Owns: moving token rows from the rank that routed them to the ranks whose slots hold the chosen
experts, and the weighted results back — with uneven splits, optional dedup, optional capacity
dropping, optional chunked pipelining, and a correct backward. Implements the ``Dispatcher``
protocol of ``moetrain.model.moe.dispatcher``; returns frozen metadata and keeps no state between
phases (the per-placement route table is cached, it never changes for a placement).

Legend: T local tokens, K top-k, D model dim, R ranks, U units sent by this rank, V units received,
N (unit, k) pairs received = rows handed to the local experts, S local slots, C chunks,
M unit positions per (chunk, rank): T with dedup, T*K without.

A *unit* is what travels: with ``dedup`` one unit per (token, destination rank) — a token whose
k experts share a rank is sent there **once** and fanned out locally; without dedup one unit per
(token, k) pair. Each unit carries its row ``x_D`` plus a K-wide vector of routing weights (zero
where that k does not go to this rank) in one autograd all-to-all, and a K-wide int vector of
destination local slots (-1 where not) in a metadata all-to-all. The destination computes its
experts, forms the weighted sum per unit, and returns one row per unit.

Host synchronisation: **one per layer forward.** Every count the phases need — units per
(chunk, destination), rows per (chunk, destination slot), the pairs kept — is computed on the
device, exchanged in one small int all-to-all, and read with a single ``.tolist()``; everything
else is sized from those numbers (``nonzero_static``, sorts with sentinels; no ``unique``, no
boolean-mask indexing, no ``bincount``, which reads ``min()`` and ``max()`` to the host on CUDA: ``count_ids``).
tests/parallel/test_chunked_dispatch.py counts them for a layer, tests/parallel/test_host_syncs.py
for a whole training step. The metadata's ``sent`` (:class:`SentRows`) is what was sent, by link.

Chunks (``chunks`` C > 1, :meth:`AllToAllDispatcher.run`): the tokens are cut into C contiguous
blocks; the rows of block c+1 travel (asynchronous all-to-all) while the experts compute block c,
and the results of block c travel back while block c+1 computes. The backward pipelines the
same way (``moetrain.parallel.a2a``). Capacity is still decided over all T tokens before
chunking, so the result equals the unchunked one (and the single-process model) up to float
summation order.

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

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moetrain.model.moe.dispatcher import DispatchMeta, SentRows, capacity_keep_mask, count_ids, expert_capacity
from moetrain.parallel.a2a import CommClock, Pending, all_to_all, all_to_all_ints, start_all_to_all, wait_all_to_all
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.fanout import fan_out_rows, weighted_unit_sums
from moetrain.parallel.traffic import LayerTally, link_of_R
from moetrain.precision import to_compute
from placement.placement import Placement

DEFAULT_CHUNKS = 1  # pipelined chunks per layer; 1 = one blocking all-to-all each way


def route_table(placement: Placement, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Destination of (source rank, expert): ``(dest_rank_RE, dest_local_slot_RE)`` (read-only,
    cached per placement and layer)."""
    return _route_table(placement, layer)


@functools.lru_cache(maxsize=256)
def _route_table(placement: Placement, layer: int) -> tuple[np.ndarray, np.ndarray]:
    R, E = placement.num_ranks, placement.num_experts
    slot_rank = placement.slot_rank_S
    offsets = placement.slot_offset_R
    dest_rank = np.empty((R, E), dtype=np.int64)
    dest_slot = np.empty((R, E), dtype=np.int64)
    ranks_R = np.arange(R)
    for e in range(E):
        slots = placement.log2phy(layer, e)
        own_RS = slot_rank[slots][None, :] == ranks_R[:, None]
        chosen_R = np.where(own_RS.any(1), slots[own_RS.argmax(1)], slots[ranks_R % slots.size])
        dest_rank[:, e] = slot_rank[chosen_R]
        dest_slot[:, e] = chosen_R - offsets[slot_rank[chosen_R]]
    dest_rank.flags.writeable = False
    dest_slot.flags.writeable = False
    return dest_rank, dest_slot


@dataclass(frozen=True)
class EPDispatchMeta(DispatchMeta):
    send_splits: list[int]  # units sent to each rank
    recv_splits: list[int]  # units received from each rank
    unit_token_U: Tensor  # local token index of each sent unit
    pair_unit_N: Tensor  # received unit of each expert row (slot order)
    weight_N: Tensor  # routing weight of each expert row (autograd)
    num_recv_units: int
    num_tokens: int
    sent: SentRows  # units sent, by link (from send_splits)

    def sent_rows(self) -> SentRows:
        return self.sent


@dataclass(frozen=True)
class EPRunMeta(DispatchMeta):
    """What :meth:`AllToAllDispatcher.run` reports: splits and rows per slot summed over chunks."""

    send_splits: list[int]
    recv_splits: list[int]
    num_chunks: int
    sent: SentRows  # units sent, by link (from send_splits)

    def sent_rows(self) -> SentRows:
        return self.sent


@dataclass(frozen=True)
class _Plan:
    """One dispatch call's bookkeeping, chunk by chunk (lists of python ints after the one sync)."""

    send_CR: list[list[int]]  # units this rank sends, per chunk and destination
    recv_CR: list[list[int]]  # units this rank receives, per chunk and source
    rows_CS: list[list[int]]  # rows per local slot, per chunk
    num_dropped: int
    unit_token_U: Tensor  # int64 [U], units in (chunk, rank, token) order
    payload_UX: Tensor  # [U, D + K]: the row and its K routing weights (autograd)
    slot_UK: Tensor  # int64 [U, K]: destination local slot of each k, -1 where elsewhere

    def unit_range(self, c: int) -> tuple[int, int]:
        start = sum(sum(s) for s in self.send_CR[:c])
        return start, start + sum(self.send_CR[c])


class AllToAllDispatcher:
    """Expert-parallel dispatcher of one MoE layer on one rank (see module docstring)."""

    def __init__(
        self,
        placement: Placement,
        layer: int,
        ctx: ParallelContext,
        *,
        capacity_factor: float = 0.0,
        dedup: bool = True,
        chunks: int = DEFAULT_CHUNKS,
        clock: CommClock | None = None,
        tally: LayerTally | None = None,
    ):
        if chunks < 1:
            raise ValueError(f"chunks ({chunks}) must be >= 1")
        self.ctx = ctx
        self.num_experts = placement.num_experts
        self.num_ranks = placement.num_ranks
        self.num_local_slots = placement.slots_per_rank[ctx.rank]
        self.max_slots = max(placement.slots_per_rank)
        self.capacity_factor = capacity_factor
        self.dedup = dedup
        self.chunks = chunks
        self.clock = clock
        self.tally = tally  # counts the bytes this layer's all-to-alls send (moetrain.parallel.traffic)
        self.lean_backward = True  # moetrain.parallel.fanout; False: plain indexing (reference, A/B)
        self.link_R = link_of_R(ctx.node_R, ctx.rank, self.num_ranks)  # 0 same node, 1 another
        dest_rank, dest_slot = route_table(placement, layer)
        self._dest_rank_E = torch.from_numpy(dest_rank[ctx.rank].copy()).to(ctx.device)
        self._dest_slot_E = torch.from_numpy(dest_slot[ctx.rank].copy()).to(ctx.device)

    # ---- bookkeeping: one host sync ---------------------------------------------------------
    def _positions(self, topk_ids_TK: Tensor, chunks: int) -> tuple[Tensor, Tensor, int]:
        """Unit key of every (token, k) pair in a space of C*R*M positions ordered by (chunk,
        destination rank, token[, k]); returns (key_TK, dest_slot_TK, M)."""
        T, K = topk_ids_TK.shape
        R, dev = self.num_ranks, topk_ids_TK.device
        dest_rank_TK = self._dest_rank_E[topk_ids_TK]
        tok_T1 = torch.arange(T, device=dev).unsqueeze(1)
        chunk_T1 = tok_T1 // max(1, -(-T // chunks))
        if self.dedup:
            M, pos_TK = T, tok_T1.expand(T, K)
        else:
            M, pos_TK = T * K, torch.arange(T * K, device=dev).view(T, K)
        return (chunk_T1 * R + dest_rank_TK) * M + pos_TK, self._dest_slot_E[topk_ids_TK], M

    def _exchange_counts(self, hit_P: Tensor, slot_key_TK: Tensor, kept: Tensor, chunks: int, M: int):
        """Units per (chunk, rank) and rows per (chunk, rank, slot) to every destination; returns
        python lists (send_CR, recv_CR, rows_CS, kept) from the layer's single ``.tolist()``."""
        R, S, C = self.num_ranks, self.max_slots, chunks
        units_CR1 = hit_P.view(C, R, M).sum(2, dtype=torch.int64).unsqueeze(-1)
        rows_CRS = count_ids(slot_key_TK, C * R * S + 1)[: C * R * S].view(C, R, S)
        send_RCX = torch.cat([units_CR1, rows_CRS], dim=2).transpose(0, 1).contiguous()
        recv_RCX = (
            all_to_all_ints(send_RCX, [1] * R, [1] * R, self.ctx.group, tally=self.tally)
            if self.ctx.distributed
            else send_RCX
        )
        vals = torch.cat([send_RCX.view(-1), recv_RCX.view(-1), kept.view(1)]).tolist()  # the host sync
        n = R * C * (1 + S)
        send = np.asarray(vals[:n]).reshape(R, C, 1 + S)
        recv = np.asarray(vals[n : 2 * n]).reshape(R, C, 1 + S)
        rows_CS = recv[:, :, 1 : 1 + self.num_local_slots].sum(0)
        return send[:, :, 0].T.tolist(), recv[:, :, 0].T.tolist(), rows_CS.tolist(), int(vals[-1])

    def _plan(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, chunks: int) -> _Plan:
        x_TD = to_compute(x_TD)  # bf16 payloads (rows and weights) both ways under a bf16 autocast
        T, K = topk_ids_TK.shape
        R, S, C, dev = self.num_ranks, self.max_slots, chunks, topk_ids_TK.device
        key_TK, dest_slot_TK, M = self._positions(topk_ids_TK, C)
        space = C * R * M
        cap = expert_capacity(T, K, self.num_experts, self.capacity_factor)
        if cap is None:
            kept = torch.tensor(T * K, device=dev)
            keep_key_TK = key_TK
        else:
            keep_TK = capacity_keep_mask(topk_ids_TK, self.num_experts, cap)
            kept = keep_TK.sum()
            keep_key_TK = torch.where(keep_TK, key_TK, space)  # dropped pairs -> sentinel position
        hit_P = torch.zeros(space + 1, dtype=torch.bool, device=dev)
        hit_P = hit_P.index_fill_(0, keep_key_TK.reshape(-1), True)[:space]
        # rows per (chunk, destination rank, destination slot); dropped pairs -> sentinel bin C*R*S
        cr_TK = keep_key_TK // M
        slot_key_TK = torch.where(keep_key_TK < space, cr_TK * S + dest_slot_TK, C * R * S)
        send_CR, recv_CR, rows_CS, n_kept = self._exchange_counts(hit_P, slot_key_TK, kept, C, M)
        U = sum(map(sum, send_CR))
        unit_pos_U = hit_P.nonzero_static(size=U).view(-1) % M
        unit_token_U = unit_pos_U if self.dedup else unit_pos_U // K
        unit_of_pos_P = torch.cumsum(hit_P, 0) - 1
        pair_unit_P = torch.where(keep_key_TK < space, unit_of_pos_P[keep_key_TK.clamp(max=space - 1)], U).view(-1)
        k_P = torch.arange(K, device=dev).repeat(T)
        w_UK = topk_weights_TK.new_zeros((U + 1, K)).index_put(
            (pair_unit_P, k_P), topk_weights_TK.reshape(-1), accumulate=True
        )[:U]
        slot_UK = (
            torch.zeros((U + 1, K), dtype=torch.int64, device=dev).index_put_(
                (pair_unit_P, k_P), dest_slot_TK.reshape(-1) + 1, accumulate=True
            )[:U]
            - 1
        )
        payload_UX = torch.cat([x_TD.index_select(0, unit_token_U), w_UK.to(x_TD.dtype)], dim=1)
        return _Plan(send_CR, recv_CR, rows_CS, T * K - n_kept, unit_token_U, payload_UX, slot_UK)

    # ---- the receiving side ---------------------------------------------------------------
    def _fan_out(self, recv_VX: Tensor, slot_VK: Tensor, num_rows: int, D: int):
        """Received units -> expert rows grouped by local slot (stable: by source, token, k)."""
        K = slot_VK.shape[1]
        key = torch.where(slot_VK >= 0, slot_VK, self.num_local_slots).view(-1)
        order_N = torch.argsort(key, stable=True)[:num_rows]
        pair_unit_N, k_N = order_N // K, order_N % K
        if not self.lean_backward:
            return recv_VX[:, :D].index_select(0, pair_unit_N), pair_unit_N, recv_VX[pair_unit_N, D + k_N]
        x_ND, weight_N = fan_out_rows(recv_VX, pair_unit_N, k_N, D)
        return x_ND, pair_unit_N, weight_N

    def _unit_sums(self, y_ND: Tensor, pair_unit_N: Tensor, weight_N: Tensor, num_units: int) -> Tensor:
        """y_VD[v] = sum of weight * expert row over the rows of received unit v."""
        if self.lean_backward:
            return weighted_unit_sums(y_ND, weight_N, pair_unit_N, num_units)
        weighted = y_ND * weight_N.unsqueeze(1).to(y_ND.dtype)
        return y_ND.new_zeros((num_units, y_ND.shape[1])).index_add(0, pair_unit_N, weighted)

    # ---- dispatch / combine (one blocking all-to-all each way) -------------------------------
    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor):
        D, group = x_TD.shape[1], self.ctx.group
        plan = self._plan(x_TD, topk_ids_TK, topk_weights_TK, 1)
        send, recv = plan.send_CR[0], plan.recv_CR[0]
        recv_VX = all_to_all(plan.payload_UX, recv, send, group, self.clock, self.tally)
        slot_VK = all_to_all_ints(plan.slot_UK, recv, send, group, self.clock, self.tally)
        x_ND, pair_unit_N, weight_N = self._fan_out(recv_VX, slot_VK, sum(plan.rows_CS[0]), D)
        meta = EPDispatchMeta(
            tokens_per_slot=plan.rows_CS[0],
            num_dropped=plan.num_dropped,
            send_splits=send,
            recv_splits=recv,
            unit_token_U=plan.unit_token_U,
            pair_unit_N=pair_unit_N,
            weight_N=weight_N,
            num_recv_units=recv_VX.shape[0],
            num_tokens=x_TD.shape[0],
            sent=SentRows.from_splits(send, self.ctx.rank, self.link_R),
        )
        return x_ND, meta

    def combine(self, y_ND: Tensor, meta: EPDispatchMeta) -> Tensor:
        y_VD = self._unit_sums(y_ND, meta.pair_unit_N, meta.weight_N, meta.num_recv_units)
        y_UD = all_to_all(y_VD, meta.send_splits, meta.recv_splits, self.ctx.group, self.clock, self.tally)
        return y_UD.new_zeros((meta.num_tokens, y_UD.shape[1])).index_add(0, meta.unit_token_U, y_UD)

    # ---- dispatch, experts, combine, pipelined over chunks ------------------------------------
    def run(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, experts) -> tuple[Tensor, DispatchMeta]:
        """out_TD = combine(experts(dispatch(x))), with ``experts(x_ND, tokens_per_slot)``; with
        ``chunks`` > 1 the transfer of chunk c+1 (and the return of chunk c) overlaps the expert
        compute of chunk c."""
        if self.chunks == 1:
            x_ND, meta = self.dispatch(x_TD, topk_ids_TK, topk_weights_TK)
            return self.combine(experts(x_ND, meta.tokens_per_slot), meta), meta
        C, D, group = self.chunks, x_TD.shape[1], self.ctx.group
        plan = self._plan(x_TD, topk_ids_TK, topk_weights_TK, C)

        def start(c: int):
            a, b = plan.unit_range(c)
            send, recv = plan.send_CR[c], plan.recv_CR[c]
            buf, pend = start_all_to_all(plan.payload_UX[a:b], recv, send, group, self.clock, self.tally)
            slot_pend = Pending(self.clock, self.tally)
            slot_VK = plan.slot_UK.new_empty((sum(recv), plan.slot_UK.shape[1]))
            slot_pend.launch(slot_VK, plan.slot_UK[a:b].contiguous(), recv, send, group)
            return buf, pend, slot_VK, slot_pend

        inflight = {0: start(0)}
        back = []
        for c in range(C):
            if c + 1 < C:
                inflight[c + 1] = start(c + 1)
            buf, pend, slot_VK, slot_pend = inflight.pop(c)
            send, recv = plan.send_CR[c], plan.recv_CR[c]
            recv_VX = wait_all_to_all(buf, pend, recv, send, group)
            slot_pend.wait()
            x_ND, pair_unit_N, weight_N = self._fan_out(recv_VX, slot_VK, sum(plan.rows_CS[c]), D)
            y_VD = self._unit_sums(experts(x_ND, plan.rows_CS[c]), pair_unit_N, weight_N, sum(recv))
            back.append((*start_all_to_all(y_VD, send, recv, group, self.clock, self.tally), send, recv))
        y_UD = torch.cat([wait_all_to_all(buf, pend, send, recv, group) for buf, pend, send, recv in back])
        out_TD = y_UD.new_zeros((x_TD.shape[0], D)).index_add(0, plan.unit_token_U, y_UD)
        send_R = np.sum(plan.send_CR, axis=0).tolist()
        meta = EPRunMeta(
            tokens_per_slot=np.sum(plan.rows_CS, axis=0).tolist(),
            num_dropped=plan.num_dropped,
            send_splits=send_R,
            recv_splits=np.sum(plan.recv_CR, axis=0).tolist(),
            num_chunks=C,
            sent=SentRows.from_splits(send_R, self.ctx.rank, self.link_R),
        )
        return out_TD, meta
