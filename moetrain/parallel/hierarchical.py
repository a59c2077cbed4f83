"""Node-level (hierarchical) token dispatch: a token crosses to a remote node once.

Owns: :class:`HierarchicalDispatcher`, the ``model.moe.dispatch: hierarchical`` implementation of
the ``Dispatcher`` protocol (frozen metadata, nothing stored on ``self`` between phases).

Legend: T local tokens, K top-k, D model dim, R ranks, G nodes, S slots per rank (max),
U1 / V1 stage-1 units sent / received, U2 / V2 stage-2 units sent / received, N expert rows.

Two stages each way (DeepEP / DeepSpeed-MoE hierarchical all-to-all):
1. **inter-node**: one unit per (token, destination node) — however many of the token's experts
   live on that node — goes to the node's *gateway* for this source rank: the rank of that node
   whose local index equals the source's local index modulo the node's size (for the source's
   own node that is the source itself: a local copy). A unit carries the row, the K routing
   weights (0 where k goes to another node or was dropped) and K destination codes
   ``rank * S + local slot`` (-1 where not in that node).
2. **intra-node**: the gateway forwards every received unit once to each rank of its node that
   holds one of its experts (one unit per (unit, holder rank): dedup), with the weights and local
   slots of that rank only. The holder fans rows out to its slots exactly like the flat
   dispatcher, computes, and returns one weighted partial sum per unit.
Back: the gateway adds its node's partial sums per stage-1 unit and returns **one row per
(token, node)**; the source adds the rows of its token's nodes. The backward runs the same
all-to-alls in reverse (autograd, ``moetrain.parallel.a2a``).

Routing decisions are the flat dispatcher's: the replica of (source rank, expert) comes from the
same ``route_table``, and capacity is decided per source rank before anything is sent
(``capacity_keep_mask``), so results equal flat dispatch and the single-process model up to the
float summation order of the per-node partial sums.

Host synchronisation: **one per layer forward**, as in flat dispatch. Every rank computes on the
device its units per destination node, its dedup units per destination rank and its rows per
(rank, slot); one small int all-to-all gives every rank all ranks' counts, read with a single
``.tolist()``; both stages' splits (and the rows per local slot) follow from them on the host,
because the gateway map is fixed (stage-2 units from gateway g to rank h = the dedup units to h of
the sources whose gateway in h's node is g).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moetrain.model.moe.dispatcher import DispatchMeta, SentRows, capacity_keep_mask, count_ids, expert_capacity
from moetrain.parallel.a2a import CommClock, all_to_all, all_to_all_ints
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dispatcher import route_table
from moetrain.parallel.fanout import fan_out_rows, weighted_unit_sums
from moetrain.parallel.traffic import LayerTally, link_of_R
from moetrain.precision import to_compute
from placement.placement import Placement


def node_ranks(node_R: tuple[int, ...], world_size: int) -> list[list[int]]:
    """Ranks of every node, checking that the map is contiguous per node and numbered 0..G-1."""
    node_R = tuple(node_R) or (0,) * world_size
    if len(node_R) != world_size:
        raise ValueError(f"node map {node_R} has {len(node_R)} entries for {world_size} ranks")
    if list(node_R) != sorted(node_R) or sorted(set(node_R)) != list(range(max(node_R) + 1)):
        raise ValueError(f"node map {node_R} must number nodes 0..G-1 with each node's ranks contiguous")
    return [[r for r in range(world_size) if node_R[r] == n] for n in range(max(node_R) + 1)]


def gateway_table(nodes: list[list[int]]) -> np.ndarray:
    """``gateway_RG[s, g]``: the rank of node g that receives source rank s's units for node g."""
    R = sum(len(n) for n in nodes)
    local = {r: i for n in nodes for i, r in enumerate(n)}
    return np.array([[n[local[s] % len(n)] for n in nodes] for s in range(R)], dtype=np.int64)


def expert_nodes(placement: Placement, layer: int, node_R: tuple[int, ...]) -> np.ndarray:
    """Node of every logical expert of ``layer``, [E]: the node of its primary (first) replica —
    the map node-limited routing uses (``TopKRouter.set_expert_nodes``)."""
    node_R = tuple(node_R) or (0,) * placement.num_ranks
    primary_E = [int(placement.log2phy(layer, e)[0]) for e in range(placement.num_experts)]
    return np.array([node_R[int(placement.slot_rank_S[s])] for s in primary_E], dtype=np.int64)


@dataclass(frozen=True)
class HierDispatchMeta(DispatchMeta):
    send1: list[int]  # stage-1 units to each rank (non-zero only at this rank's gateways)
    recv1: list[int]  # stage-1 units from each source (as a gateway)
    send2: list[int]  # stage-2 units to each rank of this node (as a gateway)
    recv2: list[int]  # stage-2 units from each gateway of this node (as a holder)
    unit_token_U1: Tensor  # local token of each stage-1 unit sent
    unit_v1_U2: Tensor  # received stage-1 unit each stage-2 unit forwards
    pair_unit_N: Tensor  # received stage-2 unit of each expert row (slot order)
    weight_N: Tensor  # routing weight of each expert row (autograd)
    num_tokens: int
    # this rank's (token, destination rank) units by link — what flat dedup dispatch sends for the
    # same routing (the routing's demand); the stage splits above are what really travelled
    sent: SentRows

    def sent_rows(self) -> SentRows:
        return self.sent

    @property
    def send_splits(self) -> list[int]:
        """Rows this rank sent to each rank in both stages (for metrics)."""
        return [a + b for a, b in zip(self.send1, self.send2)]


@dataclass(frozen=True)
class _Splits:
    send1: list[int]
    recv1: list[int]
    send2: list[int]
    recv2: list[int]
    rows_S: list[int]
    num_kept: int
    units_R: list[int]  # this rank's dedup units per destination rank (as flat dispatch)


class HierarchicalDispatcher:
    """Two-stage (node, then rank) expert-parallel dispatcher of one MoE layer (module docstring)."""

    def __init__(
        self,
        placement: Placement,
        layer: int,
        ctx: ParallelContext,
        *,
        capacity_factor: float = 0.0,
        clock: CommClock | None = None,
        tally: LayerTally | None = None,
    ):
        self.ctx, self.clock, self.tally = ctx, clock, tally
        self.num_experts = placement.num_experts
        self.num_ranks = R = placement.num_ranks
        self.num_local_slots = placement.slots_per_rank[ctx.rank]
        self.max_slots = max(placement.slots_per_rank)
        self.capacity_factor = capacity_factor
        self.dedup = True  # per node and per rank, always
        self.nodes = node_ranks(ctx.node_R, R)
        self.node_of_R = np.array([n for n, rs in enumerate(self.nodes) for _ in rs], dtype=np.int64)
        self.my_node = int(self.node_of_R[ctx.rank])
        self.gateway_RG = gateway_table(self.nodes)
        self.link_R = link_of_R(ctx.node_R, ctx.rank, R)
        dest_rank, dest_slot = route_table(placement, layer)  # the flat dispatcher's replica choice
        self._dest_rank_E = torch.from_numpy(dest_rank[ctx.rank].copy()).to(ctx.device)
        self._dest_slot_E = torch.from_numpy(dest_slot[ctx.rank].copy()).to(ctx.device)
        self._dest_node_E = torch.from_numpy(self.node_of_R[dest_rank[ctx.rank]]).to(ctx.device)

    # ---- counts: the layer's one host sync ----------------------------------------------------
    def _splits(self, counts_X: Tensor) -> _Splits:
        """All ranks' counts -> both stages' splits for this rank (see the module docstring)."""
        R, G, S, me = self.num_ranks, len(self.nodes), self.max_slots, self.ctx.rank
        all_RX = (
            all_to_all_ints(
                counts_X.expand(R, -1).contiguous(), [1] * R, [1] * R, self.ctx.group, self.clock, self.tally
            )
            if self.ctx.distributed
            else counts_X.unsqueeze(0)
        )
        vals = np.asarray(all_RX.reshape(-1).tolist(), dtype=np.int64).reshape(R, -1)  # the host sync
        node_units_RG, rank_units_RR = vals[:, :G], vals[:, G : G + R]
        rows_RRS = vals[:, G + R : G + R + R * S].reshape(R, R, S)
        gw, mine = self.gateway_RG, self.nodes[self.my_node]
        send1, recv1, send2, recv2 = ([0] * R for _ in range(4))
        for g in range(G):
            send1[gw[me, g]] = int(node_units_RG[me, g])
        for s in range(R):
            g_s = int(gw[s, self.my_node])  # s's gateway in my node
            if g_s == me:
                recv1[s] = int(node_units_RG[s, self.my_node])
                for h in mine:
                    send2[h] += int(rank_units_RR[s, h])
            recv2[g_s] += int(rank_units_RR[s, me])
        rows_S = rows_RRS[:, me, : self.num_local_slots].sum(0).tolist()
        return _Splits(send1, recv1, send2, recv2, rows_S, int(vals[me, -1]), rank_units_RR[me].tolist())

    # ---- stage 1: (token, node) units from the source -----------------------------------------
    def _stage1(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor):
        T, K = topk_ids_TK.shape
        R, G, S, dev = self.num_ranks, len(self.nodes), self.max_slots, topk_ids_TK.device
        rank_TK, slot_TK, node_TK = (t[topk_ids_TK] for t in (self._dest_rank_E, self._dest_slot_E, self._dest_node_E))
        cap = expert_capacity(T, K, self.num_experts, self.capacity_factor)
        keep_TK = (
            torch.ones_like(topk_ids_TK, dtype=torch.bool)
            if cap is None
            else capacity_keep_mask(topk_ids_TK, self.num_experts, cap)
        )
        tok_T1 = torch.arange(T, device=dev).unsqueeze(1)

        def hits(key_TK: Tensor, space: int) -> Tensor:
            key = torch.where(keep_TK, key_TK, space).reshape(-1)
            return torch.zeros(space + 1, dtype=torch.bool, device=dev).index_fill_(0, key, True)[:space]

        key1_TK = node_TK * T + tok_T1
        hit1_P = hits(key1_TK, G * T)
        slot_key = torch.where(keep_TK, rank_TK * S + slot_TK, R * S).reshape(-1)
        counts_X = torch.cat(
            [
                hit1_P.view(G, T).sum(1),
                hits(rank_TK * T + tok_T1, R * T).view(R, T).sum(1),
                count_ids(slot_key, R * S + 1)[: R * S],
                keep_TK.sum().view(1),
            ]
        )
        sp = self._splits(counts_X)
        U1 = sum(sp.send1)
        unit_token_U1 = hit1_P.nonzero_static(size=U1).view(-1) % T
        unit_of_P = torch.cumsum(hit1_P, 0) - 1
        pair_unit_P = torch.where(keep_TK, unit_of_P[key1_TK], U1).view(-1)
        k_P = torch.arange(K, device=dev).repeat(T)
        w_UK = topk_weights_TK.new_zeros((U1 + 1, K)).index_put(
            (pair_unit_P, k_P), topk_weights_TK.reshape(-1), accumulate=True
        )[:U1]
        code_UK = (
            torch.zeros((U1 + 1, K), dtype=torch.int64, device=dev).index_put_(
                (pair_unit_P, k_P), (rank_TK * S + slot_TK).reshape(-1) + 1, accumulate=True
            )[:U1]
            - 1
        )
        payload_UX = torch.cat([x_TD.index_select(0, unit_token_U1), w_UK.to(x_TD.dtype)], dim=1)
        return sp, unit_token_U1, payload_UX, code_UK, T * K - sp.num_kept

    # ---- stage 2: the gateway forwards to its node's holders ----------------------------------
    def _stage2(self, recv_VX: Tensor, code_VK: Tensor, sp: _Splits, D: int):
        S, dev = self.max_slots, recv_VX.device
        V1 = recv_VX.shape[0]
        lo, size = self.nodes[self.my_node][0], len(self.nodes[self.my_node])
        rank_VK = torch.where(code_VK >= 0, code_VK // S, -1)
        key_VK = torch.where(code_VK >= 0, (rank_VK - lo) * V1 + torch.arange(V1, device=dev).unsqueeze(1), size * V1)
        hit_P = torch.zeros(size * V1 + 1, dtype=torch.bool, device=dev).index_fill_(0, key_VK.reshape(-1), True)
        pos_U2 = hit_P[: size * V1].nonzero_static(size=sum(sp.send2)).view(-1)
        v1_U2, holder_U2 = pos_U2 % V1, pos_U2 // V1 + lo
        match_UK = rank_VK.index_select(0, v1_U2) == holder_U2.unsqueeze(1)
        rows_UX = recv_VX.index_select(0, v1_U2)
        payload_UX = torch.cat([rows_UX[:, :D], rows_UX[:, D:] * match_UK.to(rows_UX.dtype)], dim=1)
        slot_UK = torch.where(match_UK, code_VK.index_select(0, v1_U2) % S, -1)
        return v1_U2, payload_UX, slot_UK

    def _fan_out(self, recv_VX: Tensor, slot_VK: Tensor, num_rows: int, D: int):
        """Received units -> expert rows grouped by local slot (stable), as the flat dispatcher."""
        K = slot_VK.shape[1]
        key = torch.where(slot_VK >= 0, slot_VK, self.num_local_slots).view(-1)
        order_N = torch.argsort(key, stable=True)[:num_rows]
        pair_unit_N = order_N // K
        x_ND, weight_N = fan_out_rows(recv_VX, pair_unit_N, order_N % K, D)
        return x_ND, pair_unit_N, weight_N

    # ---- the protocol -----------------------------------------------------------------------
    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor):
        x_TD = to_compute(x_TD)  # bf16 payloads both ways under a bf16 autocast, as flat
        D, group, c, t = x_TD.shape[1], self.ctx.group, self.clock, self.tally
        sp, unit_token_U1, payload1_UX, code1_UK, dropped = self._stage1(x_TD, topk_ids_TK, topk_weights_TK)
        recv1_VX = all_to_all(payload1_UX, sp.recv1, sp.send1, group, c, t)
        code1_VK = all_to_all_ints(code1_UK, sp.recv1, sp.send1, group, c, t)
        v1_U2, payload2_UX, slot2_UK = self._stage2(recv1_VX, code1_VK, sp, D)
        recv2_VX = all_to_all(payload2_UX, sp.recv2, sp.send2, group, c, t)
        slot2_VK = all_to_all_ints(slot2_UK, sp.recv2, sp.send2, group, c, t)
        x_ND, pair_unit_N, weight_N = self._fan_out(recv2_VX, slot2_VK, sum(sp.rows_S), D)
        meta = HierDispatchMeta(
            tokens_per_slot=sp.rows_S,
            num_dropped=dropped,
            send1=sp.send1,
            recv1=sp.recv1,
            send2=sp.send2,
            recv2=sp.recv2,
            unit_token_U1=unit_token_U1,
            unit_v1_U2=v1_U2,
            pair_unit_N=pair_unit_N,
            weight_N=weight_N,
            num_tokens=x_TD.shape[0],
            sent=SentRows.from_splits(sp.units_R, self.ctx.rank, self.link_R),
        )
        return x_ND, meta

    def combine(self, y_ND: Tensor, meta: HierDispatchMeta) -> Tensor:
        group, c, t = self.ctx.group, self.clock, self.tally
        y_V2D = weighted_unit_sums(y_ND, meta.weight_N, meta.pair_unit_N, sum(meta.recv2))
        y_U2D = all_to_all(y_V2D, meta.send2, meta.recv2, group, c, t)  # partial sums back to the gateway
        y_V1D = y_U2D.new_zeros((sum(meta.recv1), y_U2D.shape[1])).index_add(0, meta.unit_v1_U2, y_U2D)
        y_U1D = all_to_all(y_V1D, meta.send1, meta.recv1, group, c, t)  # one row per (token, node)
        return y_U1D.new_zeros((meta.num_tokens, y_U1D.shape[1])).index_add(0, meta.unit_token_U1, y_U1D)
