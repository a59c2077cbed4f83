"""The exact optimum of a single-replica layer placement, by dynamic programming over expert sets.

Owns: :func:`exact_layer` and :func:`exact_placement`, the proven-best placement of one layer
(every layer) for small instances: each expert on exactly one rank (no replicas, experts =
slots), minimising the cost model's **traffic** or **sends** (cost.py, with or without home
ranks), optionally under a cap on the busiest rank's load. Used as the tight upper bound on
what a placement can save (scripts/bench/bench_domain.py) where the hypergraph ILP's LP bound is weak.

Why it is exact and cheap: without replicas a token reaches rank r iff one of its experts lives
on r, so cost.py's objective separates by rank,

    traffic = sum_r sum_t w[o(t), r] * [experts(t) & S_r != {}]  =  sum_r f_r(S_r)

(``w = link_cost`` with home ranks, ``send_weight`` without; sends: ``off`` in place of ``w``),
and the rank load is ``sum_{e in S_r} load[e]``. The best partition of the experts into sets
``S_0, ..., S_{R-1}`` of the ranks' slot counts is a shortest path over "experts placed so far"
(a bitmask): after ranks 0..j-1 the state is the set they hold, the step to rank j picks an
``s_j``-subset of the rest. Per layer the work is ``sum_j C(E, P_j) * C(E - P_j, s_j)`` set
scores (P_j slots of the first j ranks): 16 experts on 4 ranks is 1.8 M, 20 on 4 is 47 M,
24 on 4 would be 2.5 G (refused: ``MAX_WORK``, ``MAX_EXPERTS``).

Tokens are grouped by (expert set, origin class) once, so the cost of a set is one matrix
product over the distinct groups, independent of the token count.

Legend: T tokens, K top-k, E experts, R ranks, O origin classes, M distinct (expert set) masks,
C candidate sets of one step.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from placement.cost import origin_classes
from placement.placement import Placement, PlacementError
from placement.stats import RoutingStats
from placement.topology import Topology

MAX_WORK = 100_000_000  # set scores per layer; 20 experts on 4 ranks (47 M) fit, 24 on 4 do not
MAX_EXPERTS = 22  # the dense tables have 2^E entries per rank


@dataclass(frozen=True)
class ExactLayer:
    """One layer's optimum. ``rank_E`` None when no placement meets the cap."""

    rank_E: np.ndarray | None  # rank of each expert
    cost: float  # the minimised objective per token (inf when infeasible)
    max_load: float  # busiest rank's token-expert pairs per token (nan when infeasible)
    mean_load: float  # mean rank load per token
    work: int  # set scores evaluated


def dp_work(num_experts: int, slots_per_rank: tuple[int, ...]) -> int:
    """Set scores the dynamic programme evaluates for one layer (see the module docstring)."""
    work, placed = 0, 0
    for s in slots_per_rank:
        work += math.comb(num_experts, placed) * math.comb(num_experts - placed, s)
        placed += s
    return work


def check_exact(num_experts: int, topo: Topology, max_work: int = MAX_WORK) -> None:
    """Raise :class:`PlacementError` naming why the exact programme does not apply."""
    if topo.num_slots != num_experts:
        raise PlacementError(
            f"the exact placement needs one slot per expert: {num_experts} experts, "
            f"{topo.num_slots} slots (replicas are not modelled)"
        )
    if num_experts > MAX_EXPERTS:
        raise PlacementError(f"the exact placement handles at most {MAX_EXPERTS} experts, got {num_experts}")
    work = dp_work(num_experts, topo.slots_per_rank)
    if work > max_work:
        raise PlacementError(
            f"the exact placement of {num_experts} experts on slots {topo.slots_per_rank} "
            f"needs {work:,} set scores per layer, over the limit {max_work:,}"
        )


def _token_groups(ids_TK: np.ndarray, origin_T: np.ndarray | None, num_origins: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct expert-set bitmasks [M] and their token counts per origin class [M, O]."""
    bits = np.where(ids_TK >= 0, np.left_shift(np.int64(1), np.maximum(ids_TK, 0).astype(np.int64)), 0)
    mask_T = np.bitwise_or.reduce(bits, axis=1)
    keep = mask_T != 0
    o_T = np.zeros(ids_TK.shape[0], dtype=np.int64) if origin_T is None else np.asarray(origin_T, dtype=np.int64)
    masks, inv = np.unique(mask_T[keep], return_inverse=True)
    cnt_MO = np.zeros((masks.size, num_origins))
    np.add.at(cnt_MO, (inv, o_T[keep]), 1.0)
    return masks, cnt_MO


def _popcount_table(num_experts: int) -> np.ndarray:
    pc = np.zeros(1 << num_experts, dtype=np.int8)
    for b in range(num_experts):
        pc[1 << b : 1 << (b + 1)] = pc[: 1 << b] + 1
    return pc


def _members(masks: np.ndarray, num_experts: int, size: int) -> np.ndarray:
    """The experts of each mask (all of popcount ``size``), ascending, [N, size]."""
    bit = (masks[:, None] >> np.arange(num_experts, dtype=np.int64)[None, :]) & 1
    return np.nonzero(bit)[1].reshape(masks.size, size)


class LayerTables:
    """One layer's set scores, computed once and shared by every cap: ``score[r][mask]`` is what
    the ranks-r set ``mask`` costs (inf where mask is not of size ``s_r``), ``load[mask]`` its
    load, per token."""

    def __init__(
        self,
        ids_TK: np.ndarray,
        num_experts: int,
        topo: Topology,
        w_OR: np.ndarray,
        origin_T: np.ndarray | None = None,
        unary_ER: np.ndarray | None = None,
        chunk: int = 4096,
    ):
        E, R = num_experts, topo.num_ranks
        T = max(int((ids_TK >= 0).any(axis=1).sum()), 1)  # the layer's tokens (cost.layer_tokens)
        w_OR = np.asarray(w_OR, dtype=np.float64)
        masks, cnt_MO = _token_groups(ids_TK, origin_T, w_OR.shape[0])
        wsum_MR = cnt_MO @ w_OR / T  # what reaching r costs, per expert set
        load_E = np.bincount(ids_TK[ids_TK >= 0].ravel(), minlength=E).astype(np.float64) / T
        self.E, self.slots = E, topo.slots_per_rank
        self.mean = float(load_E.sum()) / R
        self.pc = _popcount_table(E)
        self.load = np.zeros(1 << E)
        for e in range(E):
            self.load[1 << e : 1 << (e + 1)] = self.load[: 1 << e] + load_E[e]
        self.score = []
        for r, s in enumerate(topo.slots_per_rank):
            table = np.full(1 << E, np.inf)
            cand = np.flatnonzero(self.pc == s).astype(np.int64)
            for i in range(0, cand.size, chunk):
                sub = cand[i : i + chunk]
                table[sub] = ((sub[:, None] & masks[None, :]) != 0).astype(np.float64) @ wsum_MR[:, r]
                if unary_ER is not None:
                    table[sub] += unary_ER[_members(sub, E, s), r].sum(axis=1)
            self.score.append(table)

    def solve(self, cap: float | None = None) -> ExactLayer:
        """The best partition with every rank's load <= ``cap`` (pull-style shortest path: each
        state of the first j+1 ranks looks at the s_j-subsets it could have just added)."""
        E, full = self.E, (1 << self.E) - 1
        ok = None if cap is None else self.load <= cap + 1e-12
        val = np.full(1 << E, np.inf)
        val[0] = 0.0
        chosen_steps, work, placed = [], 0, 0
        for r, s in enumerate(self.slots):
            placed += s
            states = np.flatnonzero(self.pc == placed).astype(np.int64)
            mem = _members(states, E, placed)
            combos = np.array(list(itertools.combinations(range(placed), s)), dtype=np.int64).reshape(-1, s)
            sub = np.bitwise_or.reduce(np.left_shift(np.int64(1), mem[:, combos]), axis=2)  # [N, C]
            work += sub.size
            score = self.score[r][sub] if ok is None else np.where(ok[sub], self.score[r][sub], np.inf)
            total = val[states[:, None] ^ sub] + score
            arg = total.argmin(axis=1)
            val[states] = total[np.arange(states.size), arg]
            chosen = np.zeros(1 << E, dtype=np.int64)
            chosen[states] = sub[np.arange(states.size), arg]
            chosen_steps.append(chosen)
        cost = float(val[full])
        if not math.isfinite(cost):
            return ExactLayer(None, math.inf, math.nan, self.mean, work)
        rank_E = np.empty(E, dtype=np.int64)
        state, max_load = full, 0.0
        for r in range(len(self.slots) - 1, -1, -1):
            sset = int(chosen_steps[r][state])
            rank_E[(sset >> np.arange(E)) & 1 == 1] = r
            max_load = max(max_load, float(self.load[sset]))
            state ^= sset
        return ExactLayer(rank_E, cost, max_load, self.mean, work)


def exact_layer(
    ids_TK: np.ndarray,
    num_experts: int,
    topo: Topology,
    w_OR: np.ndarray,
    origin_T: np.ndarray | None = None,
    cap: float | None = None,
    unary_ER: np.ndarray | None = None,
    max_work: int = MAX_WORK,
) -> ExactLayer:
    """The placement of one layer minimising ``sum_t sum_{r reached} w_OR[o(t), r] / T`` (plus
    ``unary_ER[e, r]`` for expert e on rank r, e.g. migration) with every rank's load
    (token-expert pairs per token) at most ``cap`` (None: no cap).

    ``origin_T``: origin class of each token (home rank), None = every token in class 0."""
    check_exact(num_experts, topo, max_work)
    return LayerTables(ids_TK, num_experts, topo, w_OR, origin_T, unary_ER).solve(cap)


def exact_placement(
    stats: RoutingStats,
    topo: Topology,
    *,
    objective: str = "sends",
    balance_cap: float | None = None,
    max_work: int = MAX_WORK,
) -> tuple[Placement | None, list[ExactLayer]]:
    """Every layer's optimum (see :func:`exact_layer`); ``objective`` "sends" (off-rank sends,
    dedup) or "traffic" (link-weighted); ``balance_cap`` caps each rank's load at that multiple of
    the mean. Home ranks in ``stats`` are used (cost.py's origin classes). Needs per-token ids.
    The placement is None if some layer has no placement within the cap."""
    if stats.topk_ids_TLK is None:
        raise PlacementError("the exact placement needs per-token expert ids (topk_ids), not aggregates")
    if objective not in ("sends", "traffic"):
        raise PlacementError(f"objective must be 'sends' or 'traffic', got {objective!r}")
    if balance_cap is not None and balance_cap < 1.0:
        raise PlacementError(f"balance_cap must be >= 1 (x mean rank load), got {balance_cap}")
    E = stats.num_experts
    check_exact(E, topo, max_work)
    origin_T, w_OR, off_OR = origin_classes(stats, topo)
    weights = off_OR if objective == "sends" else w_OR
    layers = []
    for l in range(stats.num_layers):
        tables = LayerTables(stats.topk_ids_TLK[:, l], E, topo, weights, origin_T)
        layers.append(tables.solve(None if balance_cap is None else balance_cap * tables.mean))
    if any(x.rank_E is None for x in layers):
        return None, layers
    rank_LE = np.stack([x.rank_E for x in layers if x.rank_E is not None])
    return Placement.from_expert_rank(rank_LE, topo.num_ranks), layers


@dataclass(frozen=True)
class ParetoResult:
    """The best placement of one layer for ``traffic + load_weight * max_load`` (+ unary)."""

    rank_E: np.ndarray
    objective: float
    cost: float  # the traffic (+ unary) part
    max_load: float
    solves: int  # capped programmes solved (points of the traffic / max-load front visited)
    complete: bool  # True: every front point that could win was visited, the answer is optimal


def exact_layer_with_load(
    tables: LayerTables, load_weight: float, cap: float | None = None, deadline: float | None = None
) -> ParetoResult | None:
    """Minimise ``cost + load_weight * max_load`` exactly by walking the front of (cost, max
    load): solve with no cap (or ``cap``), then again with the cap just below the last answer's
    max load, ... Each answer costs at least as much and loads its busiest rank less; the walk
    stops when the cost alone, plus ``load_weight`` x the smallest possible max load, cannot beat
    the best so far (then the best is optimal), or at ``deadline`` (time.monotonic; then it is the
    best of the front points visited). None when no placement meets ``cap``."""
    floor = tables.mean  # no placement loads its busiest rank below the mean
    best: ParetoResult | None = None
    limit, solves = cap, 0
    while True:
        x = tables.solve(limit)
        solves += 1
        if x.rank_E is None:
            break
        obj = x.cost + load_weight * x.max_load
        if best is None or obj < best.objective - 1e-12:
            best = ParetoResult(x.rank_E, obj, x.cost, x.max_load, solves, False)
        if load_weight == 0 or x.cost + load_weight * floor >= best.objective - 1e-12:
            break
        if deadline is not None and time.monotonic() > deadline:
            return (
                None
                if best is None
                else ParetoResult(best.rank_E, best.objective, best.cost, best.max_load, solves, False)
            )
        limit = x.max_load - 1e-9
    if best is None:
        return None
    return ParetoResult(best.rank_E, best.objective, best.cost, best.max_load, solves, True)
