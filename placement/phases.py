"""The phases of the ILP pipeline (pipeline.py) for one layer, each a function that offers its
answers to the layer's :class:`Best`, and the layer objective they are all scored by.

Owns: :func:`layer_objective` (the cost model's layer objective with migration), :class:`Best`
(the best row so far under the optional balance cap), the phase functions and their tuning
constants (counts and solver limits; the time shares are pipeline.py's). The phases, in the
pipeline's order, are described in pipeline.py's docstring. With fault domains
(``LayerContext.domains``) every phase keeps domains.py's rule and :class:`Best` takes no row
that breaks it.

Legend: L layers, E experts, V vertices (expert replicas), R ranks, S slots.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from placement import pairwise
from placement.baselines import greedy_layer, local_search_layer, pack_lpt, tabu_search_layer
from placement.cost import holders_ER, layer_cost, migration_bytes, origin_classes
from placement.domains import FaultDomains
from placement.exact import MAX_EXPERTS, MAX_WORK, LayerTables, dp_work, exact_layer_with_load
from placement.hyper_ilp import solve_exact, trivial_bound
from placement.hypergraph import build_hypergraph, rank_of_vertices, row_from_ranks
from placement.ilp import LP_BOUND_TIME_S, model_objective, solve_layer_model
from placement.layer_context import LayerContext
from placement.lns import lns_layer
from placement.refine import iterated_fm
from placement.topology import Topology

REFINE_ROUNDS = 48  # perturbation rounds of the iterated FM
REFINE_SWAPS = 8  # random exchanges per perturbation
MIN_PHASE_S = 0.25  # a MIP phase with less time left than this is skipped
TABU_ITERS = 150  # moves per tabu restart
TABU_TENURE = 10  # moves a moved slot stays locked (+0..2, seeded)
PERTURB_SWAPS = 12  # random exchanges before each restart after the first
MIP_MAX_NODES = 5_000  # node limit of the exact MIP (determinism; the clock is only a cap)
# HiGHS can run seconds past its time limit in a root cut round (hyper_ilp.py): it gets this
# share of the MIP phase's time, the rest absorbs the overrun (or goes to the LNS)
MIP_SOLVER_LIMIT_FRACTION = 0.5
LNS_SWEEPS = 2  # sweeps over all rank pairs
LNS_MAX_FREE = 6  # experts freed per rank in a two-rank sub-MIP
LNS_SUB_TIME_S = 0.5
TOL = 1e-12


def layer_objective(c: LayerContext, l: int, row_S: np.ndarray) -> float:
    tr, _, ml, _, _ = layer_cost(c.stats, l, row_S, c.topo, c.exact)
    mig = 0.0
    if c.cur_LS is not None:
        srank = np.repeat(np.arange(c.topo.num_ranks), c.topo.slots_per_rank)
        E, R = c.stats.num_experts, c.topo.num_ranks
        mig = migration_bytes(holders_ER(row_S, srank, E, R), holders_ER(c.cur_LS[l], srank, E, R), c.expert_bytes)
    return tr + c.load_weight * ml + c.migration_weight * mig


class Best:
    """The best row of one layer so far, the stage that found it, and the stage history. With
    ``balance_cap`` a row over the cap (imbalance above it) never replaces one within it: rows
    are ranked by how far over the cap they are, then by objective. With fault domains a row
    that breaks their rule (domains.py) is never taken."""

    def __init__(self, c: LayerContext, l: int, row: np.ndarray, source: str):
        self.c, self.l = c, l
        self.row, self.obj, self.source = row, layer_objective(c, l, row), source
        self.over = self._over(row)
        self.stages: list[tuple[str, float]] = [(source, self.obj)]

    def _over(self, row: np.ndarray) -> float:
        if self.c.balance_cap is None:
            return 0.0
        imb = layer_cost(self.c.stats, self.l, row, self.c.topo, self.c.exact)[3]
        return max(0.0, imb - self.c.balance_cap)

    def offer(self, row: np.ndarray, source: str, obj: float | None = None) -> bool:
        if not self.c.row_ok(row):
            return False
        obj = layer_objective(self.c, self.l, row) if obj is None else obj
        over = self._over(row)
        won = over < self.over - TOL or (over <= self.over + TOL and obj < self.obj - TOL)
        if won:
            self.row, self.obj, self.source, self.over = row, obj, source, over
        return won

    def mark(self, stage: str) -> None:
        self.stages.append((stage, self.obj))


def phase_heuristics(c: LayerContext, l: int) -> Best:
    greedy = greedy_layer(c.stats.load_LE[l], c.topo, c.domains)
    best = Best(c, l, greedy, "greedy")
    start = greedy
    if c.cur_LS is not None and layer_objective(c, l, c.cur_LS[l]) < best.obj and c.row_ok(c.cur_LS[l]):
        start = c.cur_LS[l].copy()
    best.offer(local_search_layer(c.stats, l, c.topo, start, **c.ls_kwargs(l)), "local_search")
    best.mark("local_search")
    return best


def perturb(
    row: np.ndarray, topo: Topology, rng: np.random.Generator, swaps: int, domains: FaultDomains | None = None
) -> np.ndarray:
    """``swaps`` random exchanges of slot contents between ranks that keep replicas apart (and,
    with ``domains``, every multi-homed expert multi-homed)."""
    rank_S = np.repeat(np.arange(topo.num_ranks), topo.slots_per_rank)
    row = row.copy()
    for _ in range(swaps):
        for _try in range(20):
            s, u = rng.integers(0, len(row), 2)
            a, b = rank_S[s], rank_S[u]
            if a != b and row[s] != row[u] and row[s] not in row[rank_S == b] and row[u] not in row[rank_S == a]:
                if domains is not None and domains.unhoming_swaps(row)[s, u]:
                    continue
                row[s], row[u] = row[u], row[s]
                break
    return row


def phase_search(c: LayerContext, l: int, best: Best, deadline: float) -> bool:
    """Tabu restarts, count-bounded; returns True if the clock cut them."""
    rng = np.random.default_rng([c.seed, l])
    for i in range(c.restarts):
        if time.monotonic() > deadline:
            return True
        start = best.row if i == 0 else perturb(best.row, c.topo, rng, PERTURB_SWAPS, c.domains)
        row, obj = tabu_search_layer(
            c.stats,
            l,
            c.topo,
            start,
            iters=TABU_ITERS,
            seed=int(rng.integers(2**31)),
            tenure=TABU_TENURE,
            deadline=deadline,
            **c.ls_kwargs(l),
        )
        best.offer(row, "tabu", layer_objective(c, l, row))
    return time.monotonic() > deadline


def phase_refine(c: LayerContext, l: int, best: Best, deadline: float) -> bool:
    """Iterated FM from the best row on the exact hypergraph (its replica counts); returns
    True if the clock cut its rounds."""
    srank = np.repeat(np.arange(c.topo.num_ranks), c.topo.slots_per_rank)
    slots_R = np.array(c.topo.slots_per_rank)
    assert c.stats.topk_ids_TLK is not None  # the exact phases run on per-token ids
    hg = build_hypergraph(c.stats.topk_ids_TLK[:, l], np.bincount(best.row, minlength=c.stats.num_experts))
    out = iterated_fm(
        hg,
        rank_of_vertices(best.row, srank),
        c.topo.send_weight_R,
        slots_R,
        c.load_weight,
        pairwise.layer_fetch_ER(c, l)[hg.expert_V],
        np.random.default_rng([c.seed, l, 1]),
        rounds=REFINE_ROUNDS,
        swaps=REFINE_SWAPS,
        deadline=deadline,
        domains=c.domains,
    )
    best.offer(row_from_ranks(out.rank_V, hg.expert_V, slots_R), "fm")
    return out.capped


def load_cap(c: LayerContext, l: int, cnt_E: np.ndarray, cover_E: np.ndarray | None = None) -> float | None:
    """The balance cap per token: ``balance_cap`` x mean rank load, never below what LPT packs
    (with fault domains, the packing that keeps the ``cover_E`` experts on two domains)."""
    if c.balance_cap is None:
        return None
    load, T, R = c.stats.load_LE[l], max(int(c.stats.tokens_L[l]), 1), c.topo.num_ranks
    lpt = pack_lpt(load, cnt_E, c.topo, c.domains, cover_E)
    srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
    lpt_max = np.bincount(srank, weights=(load / cnt_E)[lpt], minlength=R).max() / T
    return max(c.balance_cap * float(load.sum()) / T / R, float(lpt_max) * (1 + 1e-9))


@dataclass
class MipOutcome:
    bound: float = math.nan
    model_objective: float = math.nan
    bound_kind: str = ""
    model: str = "none"
    status: str = "no time for MIP"
    hyperedges: tuple[int, int] = (0, 0)
    hierarchical: bool = False


def exact_dp_applies(c: LayerContext) -> bool:
    """The set-partition programme (exact.py) solves the layer: per-token ids, one slot per expert
    (no replicas) and at most ``MAX_WORK`` set scores."""
    E = c.stats.num_experts
    return c.exact and c.topo.num_slots == E and E <= MAX_EXPERTS and dp_work(E, c.topo.slots_per_rank) <= MAX_WORK


def phase_exact_dp(c: LayerContext, l: int, best: Best, deadline: float) -> bool:
    """The proven optimum of the layer objective by exact.py's programme (traffic by set
    partition, the load term by walking the traffic / max-load front, migration as a per-(expert,
    rank) term); returns True when the walk finished (the answer is optimal)."""
    E, R = c.stats.num_experts, c.topo.num_ranks
    origin_T, w_OR, _ = origin_classes(c.stats, c.topo)
    unary = None
    if c.cur_LS is not None and c.migration_weight > 0:
        srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
        unary = c.migration_weight * c.expert_bytes * (1.0 - holders_ER(c.cur_LS[l], srank, E, R))
    assert c.stats.topk_ids_TLK is not None  # the exact phases run on per-token ids
    tables = LayerTables(c.stats.topk_ids_TLK[:, l], E, c.topo, w_OR, origin_T, unary)
    cap = None if c.balance_cap is None else c.balance_cap * tables.mean
    res = exact_layer_with_load(tables, c.load_weight, cap, deadline)
    if res is None and cap is not None:  # no placement meets the cap: the MIP's fallback (LPT's packing)
        res = exact_layer_with_load(tables, c.load_weight, load_cap(c, l, np.ones(E, dtype=np.int64)), deadline)
    if res is None:
        return False
    best.offer(row_from_ranks(res.rank_E, np.arange(E), np.array(c.topo.slots_per_rank)), "exact_dp")
    return res.complete


def phase_exact_mip(c: LayerContext, l: int, best: Best, time_s: float) -> MipOutcome:
    """The exact hypergraph ILP from the best row (its replica counts and, with fault domains,
    its multi-homed experts kept multi-homed), then swap polish."""
    topo, R = c.topo, c.topo.num_ranks
    srank = np.repeat(np.arange(R), topo.slots_per_rank)
    cnt_E = np.bincount(best.row, minlength=c.stats.num_experts)
    origin_T, w_R, _ = origin_classes(c.stats, topo)  # [O, R]: home ranks, or one uniform-origin row
    assert c.stats.topk_ids_TLK is not None  # the exact phases run on per-token ids
    hg = build_hypergraph(c.stats.topk_ids_TLK[:, l], cnt_E, origin_T, w_R.shape[0])
    fetch_VR = pairwise.layer_fetch_ER(c, l)[hg.expert_V]
    slots_R = np.array(topo.slots_per_rank)
    cover_E = None if c.domains is None else c.domains.multi_homed_E(best.row)
    out = MipOutcome(model="hypergraph", hyperedges=(min(hg.num_edges, c.max_hyperedges), hg.num_edges))
    bound, out.bound_kind = trivial_bound(hg, w_R, c.load_weight), "closed form (no time for the MIP)"
    if time_s > MIN_PHASE_S:
        res = solve_exact(
            hg,
            w_R,
            slots_R,
            c.load_weight,
            fetch_VR,
            warm_V=rank_of_vertices(best.row, srank),
            time_limit_s=MIP_SOLVER_LIMIT_FRACTION * time_s,
            max_edges=c.max_hyperedges,
            mip_gap=c.mip_gap,
            solver=c.solver,
            seed=c.seed,
            max_nodes=MIP_MAX_NODES,
            cap=load_cap(c, l, cnt_E, cover_E),
            span=None if c.domains is None or cover_E is None else (c.domains.domain_R, cover_E),
        )
        bound, out.status = res.bound, res.status
        out.bound_kind = "exact ILP bound (true objective)"
        if res.rank_V is not None:
            row = row_from_ranks(res.rank_V, hg.expert_V, slots_R)
            if not best.offer(row, "exact_ilp"):
                polished = local_search_layer(c.stats, l, topo, row, **c.ls_kwargs(l))
                best.offer(polished, "exact_ilp+polish")
    out.bound = bound
    return out


def phase_pairwise_mip(c: LayerContext, l: int, best: Best, time_s: float) -> MipOutcome:
    """Aggregates only: the pairwise ILP (flat or hierarchical), polish, and its LP bound (with
    fault domains, of the model that keeps the best row's multi-homed experts multi-homed)."""
    E, R = c.stats.num_experts, c.topo.num_ranks
    cnt_E = np.bincount(best.row, minlength=E)
    cover_E = None if c.domains is None else c.domains.multi_homed_E(best.row)
    hier = c.hierarchical
    if hier is None:
        hier = c.topo.num_nodes > 1 and (cnt_E == 1).all() and E * R >= 512
    out = MipOutcome(model="pairwise", hierarchical=bool(hier))
    mip_bound = math.nan
    if time_s > MIN_PHASE_S:
        fn = pairwise.ilp_hierarchical if hier else pairwise.ilp_flat
        row, _, mip_bound, out.status = fn(c, l, cnt_E, best.row, time_s)
        if row is not None:
            polished = local_search_layer(c.stats, l, c.topo, row, **c.ls_kwargs(l))
            best.offer(polished, "pairwise_ilp" if np.array_equal(polished, row) else "pairwise_ilp+polish")
    # the flat LP relaxation (not time-limited) backs every pairwise bound
    flat = pairwise.flat_model(c, l, cnt_E, cover_E)
    lp = solve_layer_model(flat, relax=True, time_limit_s=LP_BOUND_TIME_S, solver=c.solver).bound
    if hier:
        bound = lp
        out.bound_kind = "flat LP relaxation of the pairwise model (the hierarchical split proves no bound)"
    elif not math.isfinite(mip_bound) or (math.isfinite(lp) and lp >= mip_bound):
        bound, out.bound_kind = lp, "LP relaxation of the pairwise model"
    else:
        bound, out.bound_kind = mip_bound, "MIP dual bound of the pairwise model"
    srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
    out.model_objective = model_objective(flat, holders_ER(best.row, srank, E, R))
    out.bound = min(bound, out.model_objective) if math.isfinite(bound) else bound
    return out


def phase_lns(c: LayerContext, l: int, best: Best, deadline: float) -> tuple[int, int, int]:
    srank = np.repeat(np.arange(c.topo.num_ranks), c.topo.slots_per_rank)
    origin_T, w_OR, _ = origin_classes(c.stats, c.topo)
    assert c.stats.topk_ids_TLK is not None  # the exact phases run on per-token ids
    row, info = lns_layer(
        c.stats.topk_ids_TLK[:, l],
        best.row,
        srank,
        w_OR,
        pairwise.layer_fetch_ER(c, l),
        c.load_weight,
        lambda r: layer_objective(c, l, r),
        deadline,
        c.solver,
        max_free=LNS_MAX_FREE,
        sub_time_s=LNS_SUB_TIME_S,
        seed=c.seed * 1000 + l,
        max_sweeps=LNS_SWEEPS,
        origin_T=origin_T,
    )
    best.offer(row, best.source + "+lns")
    return info["subproblems"], info["proven"], info["improvements"]
