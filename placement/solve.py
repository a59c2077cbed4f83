"""The single entry point: ``solve_placement(stats, topology, method=...) -> SolveResult``.

Owns: running a method over every layer within one time budget, the ILP pipeline's phases, the
per-layer report (:class:`LayerReport`) and the result type. Side-effect free and picklable
results, so moetrain can call it from a Ray task.

Legend: L layers, E experts, V vertices (expert replicas), R ranks, S slots.

``method="ilp"`` per layer (layer l gets an equal share of the time left: its deadline is
``now + (start + time_limit_s - now) / (L - l)``, so a layer whose MIP overran its limit, which
HiGHS can do by seconds, does not starve the next layer's search), each
phase a function below, every answer scored by the exact cost model before it is kept:

1. **heuristics** (not cut by the deadline): greedy (EPLB-style) and the deterministic swap local
   search of ``method="local_search"`` from the same start, run to convergence. Descent never
   rises, so from here on the answer is <= greedy and <= local_search **by construction**.
1b. **exact** (per-token ids, one slot per expert, at most ``exact.MAX_WORK`` set scores: e.g. 16
   experts on 4 ranks, 20 on 4; exact.py): the set-partition programme gives the optimum of the
   traffic (+ migration) under a load cap, and walking the traffic / max-load front gives the
   optimum of the whole objective (0.3-0.6 s per layer at 16 experts). When the walk finishes
   the layer is done: the answer is proven optimal (``model`` "set_partition", bound = answer)
   and the phases below are skipped; when the clock cuts it, its best answer is offered and the
   phases below run.
2. **search**: ``restarts`` tabu searches (baselines.py) of ``TABU_ITERS`` moves each, the
   first from the best answer, the others from it perturbed by ``PERTURB_SWAPS`` random
   exchanges (seeded by ``seed`` and the layer); capped at ``SEARCH_SHARE`` of the layer budget.
3. **refine** (per-token ids without home ranks: refine.py's gains assume uniform origin): iterated FM on the
exact hypergraph objective (refine.py):
   ejection chains of single-vertex moves from the best answer, then ``REFINE_ROUNDS`` rounds of
   ``REFINE_SWAPS`` seeded random exchanges + FM; capped at ``REFINE_SHARE`` of what is left.
   It reaches joint changes the swap neighbourhood misses (Qwen, 4 ranks, layer 3: 5 experts
   over 3 ranks, one token of km1 below the answer of the 8 tabu restarts).
4. **mip**: with per-token ids, the *exact* hypergraph ILP (hyper_ilp.py: connectivity of each
   distinct top-k set, and origin when the statistics carry home ranks, exactly
   ``evaluate()``'s objective, replica counts of the warm start)
   on the ``max_hyperedges`` heaviest hyperedges, warm-started from the best answer, on
   ``MIP_SHARE`` of what is left (all of it when step 5 cannot run), then swap polish of its
   answer. With aggregates only, the pairwise ILP (pairwise.py, flat or hierarchical).
5. **lns**: the exact two-rank sub-MIP over rank pairs (lns.py), ``LNS_SWEEPS`` sweeps at most,
   with the rest of the budget (needs per-token ids).
6. **bound**: exact path, the exact ILP's proven bound on the *true* layer objective (at least
   the closed-form bound: every token reaches one rank, the busiest rank carries the mean load);
   pairwise path, as before, the larger of the MIP's dual bound and the flat LP relaxation of
   the *pairwise model* (``bound_kind`` says which).

``method="validated"`` is placement/select.py's selection: these methods are its candidates, fitted
on the older part of the window and chosen per layer on its newest tokens (fit and validation
scores in ``LayerReport.fit_score`` / ``val_score`` / ``selection``).

Determinism: phases 2, 3 and 5 are bounded by counts (restarts x moves, rounds, sweeps) and
seeded; the MIPs run single-threaded with a fixed random seed and a node limit. The clock only caps them, so
two solves with the same seed return the same placement unless a phase hits its time cap
(``LayerReport.capped`` lists the phases that did).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from placement import pairwise
from placement.baselines import greedy_layer, local_search_layer, pack_lpt, tabu_search_layer
from placement.cost import CostBreakdown, evaluate, holders_ER, layer_cost, migration_bytes, origin_classes
from placement.exact import MAX_EXPERTS, MAX_WORK, LayerTables, dp_work, exact_layer_with_load
from placement.hyper_ilp import solve_exact, trivial_bound
from placement.hypergraph import build_hypergraph, rank_of_vertices, row_from_ranks
from placement.ilp import LP_BOUND_TIME_S, default_solver, model_objective, solve_layer_model
from placement.layer_context import LayerContext
from placement.lns import lns_layer
from placement.refine import iterated_fm
from placement.placement import Placement, PlacementError
from placement.stats import RoutingStats
from placement.topology import Topology

METHODS = ("ilp", "greedy", "local_search", "contiguous", "round_robin", "validated")

SEARCH_SHARE = 0.75  # tabu restarts: at most this share of the layer budget
REFINE_SHARE = 0.5  # iterated FM: at most this share of what is left after the search
REFINE_ROUNDS = 48  # perturbation rounds of the iterated FM
REFINE_SWAPS = 8  # random exchanges per perturbation
MIP_SHARE = 0.5  # the exact / pairwise MIP: this share of what is left after the refinement
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
DEFAULT_RESTARTS = 8
DEFAULT_MAX_HYPEREDGES = 200  # the exact ILP's root LP and cut rounds grow slow beyond a few hundred
TOL = 1e-12


@dataclass(frozen=True)
class LayerReport:
    """What happened in one layer: which stage's answer won, the fitted objective after each
    stage, the bound and its kind, and the seconds each phase took."""

    layer: int
    method: str
    source: str  # the stage whose answer is returned (e.g. "tabu", "exact_ilp+polish", "lns")
    objective: float  # fitted objective of the returned row (cost.py)
    stages: tuple[tuple[str, float], ...] = ()  # (stage, best fitted objective after it)
    warm_objective: float = math.nan  # best answer before the MIP phases (the MIP's warm start)
    bound: float = math.nan  # proven lower bound (nan: no ILP)
    model_objective: float = math.nan  # the bounded model's value of the returned row
    bound_kind: str = ""
    model: str = "none"  # "hypergraph" (exact) | "pairwise" | "none"
    status: str = "heuristic"  # the MIP's: "optimal" | "feasible" | "warm start only" | ...
    times: tuple[tuple[str, float], ...] = ()  # (phase, seconds)
    capped: tuple[str, ...] = ()  # phases stopped by the clock rather than their counts
    hyperedges: tuple[int, int] = (0, 0)  # (kept in the exact model, distinct in the layer)
    lns: tuple[int, int, int] = (0, 0, 0)  # (subproblems, proven optimal, improvements)
    hierarchical: bool = False
    # validated selection (select.py): the chosen candidate's objective on the fit part(s) and on
    # the newest tokens it did not see (mean over folds; nan: not validated), those tokens, every
    # candidate's (name, fit, validation) scores, and whether the answer was refitted on the window
    fit_score: float = math.nan
    val_score: float = math.nan
    val_tokens: int = 0
    selection: tuple[tuple[str, float, float], ...] = ()
    refit: bool = False

    @property
    def mip_improvement(self) -> float:
        """Fitted objective gained by the MIP phases over their warm start (>= 0)."""
        return self.warm_objective - self.objective if math.isfinite(self.warm_objective) else 0.0

    @property
    def improved_by_mip(self) -> bool:
        return self.mip_improvement > TOL

    def seconds(self, phase: str) -> float:
        return dict(self.times).get(phase, 0.0)


@dataclass(frozen=True)
class SolveResult:
    placement: Placement
    cost: CostBreakdown  # on the statistics given (exact when they hold per-token ids)
    method: str
    solver: str  # "highs" | "cbc" | "none"
    status: str  # "optimal" | "feasible" | "heuristic"
    bound: float  # sum over layers of the proven lower bounds (nan: no ILP)
    model_objective: float  # sum over layers of the bounded model's value of the answer
    gap: float  # (model_objective - bound) / |model_objective| (nan: no ILP)
    solve_time_s: float
    layers: tuple[LayerReport, ...] = field(default=())

    @property
    def fit_score(self) -> float:
        """Sum over layers of the fit-part objective (nan unless validated, select.py)."""
        return float(sum(r.fit_score for r in self.layers)) if self.layers else math.nan

    @property
    def val_score(self) -> float:
        """Sum over layers of the validation objective (nan unless validated, select.py)."""
        return float(sum(r.val_score for r in self.layers)) if self.layers else math.nan

    def summary(self) -> dict:
        return {
            "method": self.method,
            "solver": self.solver,
            "status": self.status,
            "bound": self.bound,
            "model_objective": self.model_objective,
            "gap": self.gap,
            "solve_time_s": self.solve_time_s,
            "fit_score": self.fit_score,
            "val_score": self.val_score,
            **self.cost.to_dict(),
        }


def layer_objective(c: LayerContext, l: int, row_S: np.ndarray) -> float:
    tr, _, ml, _, _ = layer_cost(c.stats, l, row_S, c.topo, c.exact)
    mig = 0.0
    if c.cur_LS is not None:
        srank = np.repeat(np.arange(c.topo.num_ranks), c.topo.slots_per_rank)
        E, R = c.stats.num_experts, c.topo.num_ranks
        mig = migration_bytes(holders_ER(row_S, srank, E, R), holders_ER(c.cur_LS[l], srank, E, R), c.expert_bytes)
    return tr + c.load_weight * ml + c.migration_weight * mig


class _Best:
    """The best row of one layer so far, the stage that found it, and the stage history. With
    ``balance_cap`` a row over the cap (imbalance above it) never replaces one within it: rows
    are ranked by how far over the cap they are, then by objective."""

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
        obj = layer_objective(self.c, self.l, row) if obj is None else obj
        over = self._over(row)
        won = over < self.over - TOL or (over <= self.over + TOL and obj < self.obj - TOL)
        if won:
            self.row, self.obj, self.source, self.over = row, obj, source, over
        return won

    def mark(self, stage: str) -> None:
        self.stages.append((stage, self.obj))


def _phase_heuristics(c: LayerContext, l: int) -> _Best:
    greedy = greedy_layer(c.stats.load_LE[l], c.topo)
    best = _Best(c, l, greedy, "greedy")
    start = greedy
    if c.cur_LS is not None and layer_objective(c, l, c.cur_LS[l]) < best.obj:
        start = c.cur_LS[l].copy()
    best.offer(local_search_layer(c.stats, l, c.topo, start, **c.ls_kwargs(l)), "local_search")
    best.mark("local_search")
    return best


def _perturb(row: np.ndarray, topo: Topology, rng: np.random.Generator, swaps: int) -> np.ndarray:
    """``swaps`` random exchanges of slot contents between ranks that keep replicas apart."""
    rank_S = np.repeat(np.arange(topo.num_ranks), topo.slots_per_rank)
    row = row.copy()
    for _ in range(swaps):
        for _try in range(20):
            s, u = rng.integers(0, len(row), 2)
            a, b = rank_S[s], rank_S[u]
            if a != b and row[s] != row[u] and row[s] not in row[rank_S == b] and row[u] not in row[rank_S == a]:
                row[s], row[u] = row[u], row[s]
                break
    return row


def _phase_search(c: LayerContext, l: int, best: _Best, deadline: float) -> bool:
    """Tabu restarts, count-bounded; returns True if the clock cut them."""
    rng = np.random.default_rng([c.seed, l])
    for i in range(c.restarts):
        if time.monotonic() > deadline:
            return True
        start = best.row if i == 0 else _perturb(best.row, c.topo, rng, PERTURB_SWAPS)
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


def _phase_refine(c: LayerContext, l: int, best: _Best, deadline: float) -> bool:
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
    )
    best.offer(row_from_ranks(out.rank_V, hg.expert_V, slots_R), "fm")
    return out.capped


def _load_cap(c: LayerContext, l: int, cnt_E: np.ndarray) -> float | None:
    """The balance cap per token: ``balance_cap`` x mean rank load, never below what LPT packs."""
    if c.balance_cap is None:
        return None
    load, T, R = c.stats.load_LE[l], max(int(c.stats.tokens_L[l]), 1), c.topo.num_ranks
    lpt = pack_lpt(load, cnt_E, c.topo)
    srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
    lpt_max = np.bincount(srank, weights=(load / cnt_E)[lpt], minlength=R).max() / T
    return max(c.balance_cap * float(load.sum()) / T / R, float(lpt_max) * (1 + 1e-9))


@dataclass
class _MipOutcome:
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


def _phase_exact_dp(c: LayerContext, l: int, best: _Best, deadline: float) -> bool:
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
        res = exact_layer_with_load(tables, c.load_weight, _load_cap(c, l, np.ones(E, dtype=np.int64)), deadline)
    if res is None:
        return False
    best.offer(row_from_ranks(res.rank_E, np.arange(E), np.array(c.topo.slots_per_rank)), "exact_dp")
    return res.complete


def _phase_exact_mip(c: LayerContext, l: int, best: _Best, time_s: float) -> _MipOutcome:
    """The exact hypergraph ILP from the best row (its replica counts), then swap polish."""
    topo, R = c.topo, c.topo.num_ranks
    srank = np.repeat(np.arange(R), topo.slots_per_rank)
    cnt_E = np.bincount(best.row, minlength=c.stats.num_experts)
    origin_T, w_R, _ = origin_classes(c.stats, topo)  # [O, R]: home ranks, or one uniform-origin row
    assert c.stats.topk_ids_TLK is not None  # the exact phases run on per-token ids
    hg = build_hypergraph(c.stats.topk_ids_TLK[:, l], cnt_E, origin_T, w_R.shape[0])
    fetch_VR = pairwise.layer_fetch_ER(c, l)[hg.expert_V]
    slots_R = np.array(topo.slots_per_rank)
    out = _MipOutcome(model="hypergraph", hyperedges=(min(hg.num_edges, c.max_hyperedges), hg.num_edges))
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
            cap=_load_cap(c, l, cnt_E),
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


def _phase_pairwise_mip(c: LayerContext, l: int, best: _Best, time_s: float) -> _MipOutcome:
    """Aggregates only: the pairwise ILP (flat or hierarchical), polish, and its LP bound."""
    E, R = c.stats.num_experts, c.topo.num_ranks
    cnt_E = np.bincount(best.row, minlength=E)
    hier = c.hierarchical
    if hier is None:
        hier = c.topo.num_nodes > 1 and (cnt_E == 1).all() and E * R >= 512
    out = _MipOutcome(model="pairwise", hierarchical=bool(hier))
    mip_bound = math.nan
    if time_s > MIN_PHASE_S:
        fn = pairwise.ilp_hierarchical if hier else pairwise.ilp_flat
        row, _, mip_bound, out.status = fn(c, l, cnt_E, best.row, time_s)
        if row is not None:
            polished = local_search_layer(c.stats, l, c.topo, row, **c.ls_kwargs(l))
            best.offer(polished, "pairwise_ilp" if np.array_equal(polished, row) else "pairwise_ilp+polish")
    # the flat LP relaxation (not time-limited) backs every pairwise bound
    flat = pairwise.flat_model(c, l, cnt_E)
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


def _phase_lns(c: LayerContext, l: int, best: _Best, deadline: float) -> tuple[int, int, int]:
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


def _solve_ilp_layer(c: LayerContext, l: int, deadline: float) -> tuple[np.ndarray, LayerReport]:
    times: list[tuple[str, float]] = []
    capped: list[str] = []
    t = time.monotonic()
    best = _phase_heuristics(c, l)
    times.append(("heuristics", time.monotonic() - t))
    if exact_dp_applies(c):
        t = time.monotonic()
        done = _phase_exact_dp(c, l, best, deadline)
        best.mark("exact_dp")
        times.append(("exact_dp", time.monotonic() - t))
        if done:  # proven optimal: the bound is the answer
            return best.row, LayerReport(
                l,
                "ilp",
                best.source,
                best.obj,
                tuple(best.stages),
                best.obj,
                best.obj,
                best.obj,
                "exact set partition (exact.py): the optimum",
                "set_partition",
                "optimal",
                tuple(times),
            )
        capped.append("exact_dp")
    t = time.monotonic()
    if _phase_search(c, l, best, t + SEARCH_SHARE * max(deadline - t, 0.0)):
        capped.append("search")
    best.mark("tabu")
    times.append(("search", time.monotonic() - t))
    if c.exact and c.stats.home_T is None:  # refine.py scores uniform-origin sends only
        t = time.monotonic()
        if _phase_refine(c, l, best, t + REFINE_SHARE * max(deadline - t, 0.0)):
            capped.append("refine")
        best.mark("refine")
        times.append(("refine", time.monotonic() - t))
    warm_obj = best.obj
    lns_ok = c.exact and c.topo.num_ranks >= 2
    t = time.monotonic()
    share = MIP_SHARE if lns_ok else 1.0
    phase = _phase_exact_mip if c.exact else _phase_pairwise_mip
    mip = phase(c, l, best, share * (deadline - t))
    best.mark("mip")
    times.append(("mip", time.monotonic() - t))
    lns = (0, 0, 0)
    t = time.monotonic()
    if lns_ok and deadline - t > 0.1:
        lns = _phase_lns(c, l, best, deadline)
        best.mark("lns")
        if time.monotonic() >= deadline - 0.05:
            capped.append("lns")
    times.append(("lns", time.monotonic() - t))
    if mip.model == "hypergraph":
        mip.model_objective = best.obj
        mip.bound = min(mip.bound, best.obj)
    report = LayerReport(
        l,
        "ilp",
        best.source,
        best.obj,
        tuple(best.stages),
        warm_obj,
        mip.bound,
        mip.model_objective,
        mip.bound_kind,
        mip.model,
        mip.status,
        tuple(times),
        tuple(capped),
        mip.hyperedges,
        lns,
        mip.hierarchical,
    )
    return best.row, report


def _solve_layer(c: LayerContext, l: int, method: str, deadline: float) -> tuple[np.ndarray, LayerReport]:
    if method == "ilp":
        return _solve_ilp_layer(c, l, deadline)
    t = time.monotonic()
    if method == "greedy":
        row = greedy_layer(c.stats.load_LE[l], c.topo)
    else:  # local_search, from greedy (or the current placement when that is better)
        start = greedy_layer(c.stats.load_LE[l], c.topo)
        if c.cur_LS is not None and layer_objective(c, l, c.cur_LS[l]) < layer_objective(c, l, start):
            start = c.cur_LS[l].copy()
        row = local_search_layer(c.stats, l, c.topo, start, deadline=deadline, **c.ls_kwargs(l))
    obj = layer_objective(c, l, row)
    return row, LayerReport(l, method, method, obj, ((method, obj),), times=((method, time.monotonic() - t),))


def _check_args(
    method: str,
    time_limit_s: float,
    load_weight: float,
    migration_weight: float,
    expert_bytes: float,
    balance_cap: float | None,
    restarts: int,
    max_hyperedges: int,
) -> None:
    if method not in METHODS:
        raise PlacementError(f"method ({method!r}) must be one of {', '.join(METHODS)}")
    if time_limit_s <= 0:
        raise PlacementError(f"time_limit_s ({time_limit_s}) must be > 0")
    for name, v in (
        ("load_weight", load_weight),
        ("migration_weight", migration_weight),
        ("expert_bytes", expert_bytes),
    ):
        if v < 0:
            raise PlacementError(f"{name} ({v}) must be >= 0")
    if balance_cap is not None and balance_cap < 1.0:
        raise PlacementError(f"balance_cap ({balance_cap}) must be >= 1 (a multiple of the mean load)")
    if restarts < 0:
        raise PlacementError(f"restarts ({restarts}) must be >= 0")
    if max_hyperedges < 0:
        raise PlacementError(f"max_hyperedges ({max_hyperedges}) must be >= 0")


def _layer_deadline(end: float, l: int, num_layers: int) -> float:
    """Layer l's deadline: an equal share of the time left before ``end`` (none when past it)."""
    now = time.monotonic()
    return now + max(end - now, 0.0) / (num_layers - l)


def solve_placement(
    stats: RoutingStats,
    topology: Topology,
    method: str = "ilp",
    *,
    current: Placement | None = None,
    time_limit_s: float = 10.0,
    load_weight: float = 1.0,
    migration_weight: float = 0.0,
    expert_bytes: float = 1.0,
    seed: int = 0,
    restarts: int = DEFAULT_RESTARTS,
    max_hyperedges: int = DEFAULT_MAX_HYPEREDGES,
    num_pairs: int = 400,
    mip_gap: float = 1e-4,
    solver: str | None = None,
    hierarchical: bool | None = None,
    balance_cap: float | None = None,
) -> SolveResult:
    """Place every layer's experts with ``method`` (one of METHODS) within ``time_limit_s`` in
    total, minimising the cost model's objective (cost.py); for "ilp" the convergent local search
    and the pairwise LP bound may run past it (module docstring). ``current``: the placement in
    use (migration term, extra warm start). ``seed`` / ``restarts``: the ILP pipeline's random
    choices and its number of tabu restarts (same seed, same answer: module docstring).
    ``max_hyperedges``: hyperedges in the exact ILP (hyper_ilp.py); ``num_pairs``: pairs in the
    pairwise ILP (aggregates-only statistics); ``balance_cap``: optional hard cap on the busiest
    rank, as a multiple of the mean rank load: the MIPs and the exact phase are constrained by it,
    and no row over it replaces one within it (if no phase finds one within it, the least
    imbalanced row wins). Returns a :class:`SolveResult`."""
    _check_args(
        method, time_limit_s, load_weight, migration_weight, expert_bytes, balance_cap, restarts, max_hyperedges
    )
    if method == "validated":  # select.py runs this module's methods as its candidates
        from placement.select import select_placement

        return select_placement(
            stats,
            topology,
            current=current,
            time_limit_s=time_limit_s,
            load_weight=load_weight,
            migration_weight=migration_weight,
            expert_bytes=expert_bytes,
            seed=seed,
            restarts=restarts,
            balance_cap=balance_cap,
        )
    topology.check_experts(stats.num_experts)
    L, E, R = stats.num_layers, stats.num_experts, topology.num_ranks
    if current is not None and (
        current.slots_per_rank != topology.slots_per_rank or current.num_layers != L or current.num_experts != E
    ):
        raise PlacementError(f"current {current!r} does not match the statistics / topology")
    t0 = time.monotonic()
    solver_name = "none"
    if method in ("contiguous", "round_robin"):
        ctor = Placement.contiguous if method == "contiguous" else Placement.round_robin
        p = ctor(L, E, R, topology.slots_per_rank)
        reports = [LayerReport(l, method, method, math.nan) for l in range(L)]
    else:
        ctx = LayerContext(
            stats,
            topology,
            None if current is None else current.phy2log_LS,
            load_weight,
            migration_weight,
            expert_bytes,
            num_pairs,
            mip_gap,
            solver or default_solver(),
            hierarchical,
            balance_cap,
            int(seed),
            int(restarts),
            int(max_hyperedges),
        )
        rows, reports = [], []
        for l in range(L):
            row, rep = _solve_layer(ctx, l, method, _layer_deadline(t0 + time_limit_s, l, L))
            rows.append(row)
            reports.append(rep)
        p = Placement(np.stack(rows), topology.slots_per_rank, E)
        solver_name = ctx.solver if method == "ilp" else "none"
    elapsed = time.monotonic() - t0
    cost = evaluate(
        stats,
        p,
        topology,
        current=current,
        load_weight=load_weight,
        migration_weight=migration_weight,
        expert_bytes=expert_bytes,
    )
    if method == "ilp":
        bound = float(sum(r.bound for r in reports))
        mobj = float(sum(r.model_objective for r in reports))
        gap = (mobj - bound) / abs(mobj) if mobj else 0.0
        status = "optimal" if all(r.status == "optimal" for r in reports) else "feasible"
    else:
        bound = mobj = gap = math.nan
        status = "heuristic"
    return SolveResult(p, cost, method, solver_name, status, bound, mobj, gap, elapsed, tuple(reports))
