"""The single entry point: ``solve_placement(stats, topology, method=...) -> SolveResult``.

Owns: running a method over every layer within one time budget, the ILP pipeline (convergent
local search + greedy -> flat or hierarchical ILP -> exact swap polish -> exact two-rank MIP
neighbourhood search (lns.py) -> bound), and the result type. Side-effect free and picklable results, so moetrain can call it from a Ray task.

Legend: L layers, E experts, R ranks, N nodes, S slots.

``method="ilp"`` per layer (layer l's deadline is ``start + time_limit_s * (l + 1) / L``):

1. **heuristics** (not cut by the deadline; reported as ``heuristic_s``): greedy (EPLB-style),
   and the same deterministic exact swap local search as ``method="local_search"`` from the same
   start, run to convergence. Best-improvement descent never rises, so the best of the two is
   <= greedy and <= local_search (whatever point its deadline stopped it at): **the ILP method
   never returns a worse fitted objective than greedy or local_search, by construction**.
2. **flat ILP** (ilp.py, pairwise model on the top ``num_pairs`` pairs; hierarchical
   nodes-then-ranks for multi-node problems with E x R >= 512 and no replicas) warm-started from
   the best heuristic answer (incl. random-restart local search on 40% of the layer's remaining
   budget, no-replica layers only), on 30% of what is left of the layer's budget (90% when step 3 cannot
   run), then exact swap polish of its answer.
3. **MIP neighbourhood search** (lns.py): the exact two-rank sub-MIP over rank pairs, with the
   rest of the budget (needs per-token ids).
4. **bound** (reported as ``bound_s``): the larger of the flat MIP's proven dual bound and the
   flat LP relaxation (always solved, without a time limit); in
   hierarchical mode always the flat LP relaxation (the two-stage split proves nothing).
   Every layer gets a finite bound unless the LP itself fails (``bound_kind`` says which).
   It bounds the ILP's *pairwise model* (``model_objective`` = that model's value of the
   returned placement), not the exact dedup cost.

So ``time_limit_s`` bounds the MIP phases (2, 3) of all layers together; the convergent local
search of step 1 and the LP of step 4 may run past it (each layer's figures are in
``SolveResult.layers``: times, ``warm_objective`` (best heuristic), ``objective`` (returned),
``mip_improvement``, ``source``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from placement.baselines import greedy_layer, local_search_layer, pack_lpt, replica_counts
from placement.cost import CostBreakdown, evaluate, holders_ER, layer_cost, migration_bytes
from placement.ilp import LP_BOUND_TIME_S, LayerModel, default_solver, model_objective, solve_layer_model, top_pairs
from placement.lns import lns_layer
from placement.placement import Placement, PlacementError
from placement.stats import RoutingStats
from placement.topology import Topology

METHODS = ("ilp", "greedy", "local_search", "contiguous", "round_robin")


@dataclass(frozen=True)
class SolveResult:
    placement: Placement
    cost: CostBreakdown  # on the statistics given (exact when they hold per-token ids)
    method: str
    solver: str  # "highs" | "cbc" | "none"
    status: str  # "optimal" | "feasible" | "heuristic"
    bound: float  # sum over layers of the ILP model's proven lower bound (nan: no ILP)
    model_objective: float  # sum over layers of the ILP model objective of its answer (nan: no ILP)
    gap: float  # (model_objective - bound) / |model_objective| (nan: no ILP)
    solve_time_s: float
    layers: tuple = field(default=())  # per-layer dicts: status, bound, source, times

    def summary(self) -> dict:
        return {"method": self.method, "solver": self.solver, "status": self.status,
                "bound": self.bound, "model_objective": self.model_objective, "gap": self.gap,
                "solve_time_s": self.solve_time_s, **self.cost.to_dict()}


@dataclass(frozen=True)
class _Ctx:
    stats: RoutingStats
    topo: Topology
    cur_LS: np.ndarray | None
    load_weight: float
    migration_weight: float
    expert_bytes: float
    num_pairs: int
    mip_gap: float
    solver: str
    hierarchical: bool | None
    balance_cap: float | None


def _layer_objective(c: _Ctx, l: int, row_S: np.ndarray) -> float:
    tr, _, ml, _, _ = layer_cost(c.stats, l, row_S, c.topo, c.stats.topk_ids_TLK is not None)
    mig = 0.0
    if c.cur_LS is not None:
        srank = np.repeat(np.arange(c.topo.num_ranks), c.topo.slots_per_rank)
        E, R = c.stats.num_experts, c.topo.num_ranks
        mig = migration_bytes(holders_ER(row_S, srank, E, R), holders_ER(c.cur_LS[l], srank, E, R), c.expert_bytes)
    return tr + c.load_weight * ml + c.migration_weight * mig


def _rows_from_sets(rank_sets: list, num_ranks: int) -> np.ndarray:
    return np.array([e for r in range(num_ranks) for e, rs in enumerate(rank_sets) if r in rs], dtype=np.int64)


def _layer_model(c: _Ctx, l: int, cnt_E: np.ndarray, experts: np.ndarray, ranks: np.ndarray,
                 w_R: np.ndarray, slots_R: np.ndarray, fetch_ER: np.ndarray) -> LayerModel:
    s = c.stats
    T = max(s.num_tokens, 1)
    load = s.load_LE[l][experts]
    cnt = cnt_E[experts]
    pairs, q = top_pairs(s.coact_LEE[l][np.ix_(experts, experts)], cnt, c.num_pairs)
    share = load / cnt / T
    cap = None
    if c.balance_cap is not None:
        lpt = pack_lpt(load, cnt, Topology(len(ranks), tuple(int(x) for x in slots_R)))
        lpt_max = np.bincount(np.repeat(np.arange(len(ranks)), slots_R), weights=(load / cnt)[lpt]).max() / T
        cap = max(c.balance_cap * float(share @ cnt) / len(ranks), float(lpt_max) * (1 + 1e-9))
    return LayerModel(share, cnt, pairs, q / T, w_R, np.asarray(slots_R), fetch_ER[np.ix_(experts, ranks)],
                      c.load_weight, cap)


def _fetch_ER(c: _Ctx, l: int) -> np.ndarray:
    E, R = c.stats.num_experts, c.topo.num_ranks
    if c.cur_LS is None:
        return np.zeros((E, R))
    srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
    return (holders_ER(c.cur_LS[l], srank, E, R) == 0) * (c.expert_bytes * c.migration_weight)


def _ilp_flat(c: _Ctx, l: int, cnt_E, warm_S, time_s):
    E, R = c.stats.num_experts, c.topo.num_ranks
    m = _layer_model(c, l, cnt_E, np.arange(E), np.arange(R), c.topo.send_weight_R,
                     np.array(c.topo.slots_per_rank), _fetch_ER(c, l))
    srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
    res = solve_layer_model(m, warm_ER=holders_ER(warm_S, srank, E, R), time_limit_s=time_s,
                            mip_gap=c.mip_gap, solver=c.solver)
    row = _rows_from_sets(res.rank_sets, R) if res.rank_sets else None
    return row, res.objective, res.bound, res.status


def _ilp_hierarchical(c: _Ctx, l: int, cnt_E, warm_S, time_s):
    """Experts -> nodes (inter-node costs only), then each node's experts -> its ranks."""
    topo, E, R = c.topo, c.stats.num_experts, c.topo.num_ranks
    N, node_R = topo.num_nodes, topo.node_R
    origin_N = np.bincount(node_R, weights=np.asarray(topo.origin_R), minlength=N)
    w_N = (1.0 - origin_N) * topo.inter_node_cost
    slots_N = np.bincount(node_R, weights=np.array(topo.slots_per_rank), minlength=N).astype(np.int64)
    fetch_ER = _fetch_ER(c, l)
    fetch_EN = np.stack([fetch_ER[:, node_R == n].min(axis=1) for n in range(N)], axis=1)
    m1 = _layer_model(c, l, cnt_E, np.arange(E), np.arange(N), w_N, slots_N, fetch_EN)
    m1 = LayerModel(m1.share_E, m1.cnt_E, m1.pairs_P2, m1.q_P, m1.w_R, m1.slots_R, m1.fetch_ER,
                    c.load_weight / topo.ranks_per_node, None)
    srank = np.repeat(np.arange(R), topo.slots_per_rank)
    warm_node = holders_ER(warm_S, node_R[srank], E, N)
    r1 = solve_layer_model(m1, warm_ER=warm_node, time_limit_s=time_s / 2, mip_gap=c.mip_gap, solver=c.solver)
    if not r1.rank_sets:
        return None, math.nan, math.nan, r1.status
    rank_sets: list[list[int]] = [[] for _ in range(E)]
    for n in range(N):
        experts = np.array([e for e in range(E) if n in r1.rank_sets[e]], dtype=np.int64)
        ranks = np.flatnonzero(node_R == n)
        m2 = _layer_model(c, l, cnt_E, experts, ranks, topo.send_weight_R[ranks],
                          np.array(topo.slots_per_rank)[ranks], fetch_ER)
        r2 = solve_layer_model(m2, time_limit_s=time_s / (2 * N), mip_gap=c.mip_gap, solver=c.solver)
        if not r2.rank_sets:
            return None, math.nan, math.nan, r2.status
        for i, e in enumerate(experts):
            rank_sets[e] = [int(ranks[r]) for r in r2.rank_sets[i]]
    flat = _layer_model(c, l, cnt_E, np.arange(E), np.arange(R), topo.send_weight_R,
                        np.array(topo.slots_per_rank), fetch_ER)
    row = _rows_from_sets(rank_sets, R)
    obj = model_objective(flat, holders_ER(row, srank, E, R))
    # stages solved to optimality do not make the split optimal for the flat model: no bound here
    # (the caller computes the flat LP relaxation)
    return row, obj, math.nan, "feasible"


def _flat_model(c: _Ctx, l: int, cnt_E: np.ndarray) -> LayerModel:
    E, R = c.stats.num_experts, c.topo.num_ranks
    return _layer_model(c, l, cnt_E, np.arange(E), np.arange(R), c.topo.send_weight_R,
                        np.array(c.topo.slots_per_rank), _fetch_ER(c, l))


def _multistart(c: _Ctx, l: int, best_S: np.ndarray, deadline: float, kw: dict) -> np.ndarray:
    """Local search from random permutations (seeded by layer) until ``deadline``; keep the best
    (no replicas only: a random permutation may co-locate two replicas)."""
    rng = np.random.default_rng(1000 + l)
    best_obj = _layer_objective(c, l, best_S)
    while time.monotonic() < deadline:
        row = local_search_layer(c.stats, l, c.topo, rng.permutation(best_S), deadline=deadline, **kw)
        obj = _layer_objective(c, l, row)
        if obj < best_obj - 1e-12:
            best_S, best_obj = row, obj
    return best_S


def _solve_layer(c: _Ctx, l: int, method: str, deadline: float) -> tuple[np.ndarray, dict]:
    s, topo = c.stats, c.topo
    E, R = s.num_experts, topo.num_ranks
    load_E = s.load_LE[l]
    cnt_E = replica_counts(load_E, topo)
    greedy = greedy_layer(load_E, topo)
    info: dict = {"layer": l, "bound": math.nan, "model_objective": math.nan, "status": "heuristic"}
    if method == "greedy":
        return greedy, info
    start = greedy
    if c.cur_LS is not None and _layer_objective(c, l, c.cur_LS[l]) < _layer_objective(c, l, start):
        start = c.cur_LS[l].copy()
    kw = dict(load_weight=c.load_weight, migration_weight=c.migration_weight, expert_bytes=c.expert_bytes,
              cur_S=None if c.cur_LS is None else c.cur_LS[l])
    if method == "local_search":
        return local_search_layer(s, l, topo, start, deadline=deadline, **kw), info
    # ---- method == "ilp" -------------------------------------------------------------------
    # phase 1, heuristics: the same deterministic local search as method="local_search", run to
    # convergence (not cut by the deadline), plus greedy itself. Best-improvement descent never
    # rises, so this is <= local_search (whatever its deadline cut) and <= greedy, by construction.
    t1 = time.monotonic()
    ls = local_search_layer(s, l, topo, start, **kw)
    cands = {"greedy": greedy, "local_search": ls}
    objs = {k: _layer_objective(c, l, v) for k, v in cands.items()}
    src = min(objs, key=objs.get)
    best, best_obj = cands[src], objs[src]
    info.update(heuristic_s=time.monotonic() - t1)
    # random-restart local search (seeded per layer) on 40% of what is left: more local optima
    t_ms = time.monotonic()
    if deadline - t_ms > 0.25 and topo.num_slots == E:
        ms = _multistart(c, l, best, t_ms + 0.4 * (deadline - t_ms), kw)
        o = _layer_objective(c, l, ms)
        if o < best_obj - 1e-12:
            best, best_obj, src = ms, o, "multistart"
    warm_obj = best_obj
    info.update(multistart_s=time.monotonic() - t_ms, warm_objective=warm_obj, warm_source=src)
    # phase 2, the flat ILP (pairwise model) warm-started from the best heuristic answer, on a
    # share of what is left of the layer's budget; then exact swap polish of its answer
    srank = np.repeat(np.arange(R), topo.slots_per_rank)
    hier = c.hierarchical
    if hier is None:
        hier = topo.num_nodes > 1 and (cnt_E == 1).all() and E * R >= 512
    exact = s.topk_ids_TLK is not None
    lns_ok = exact and R >= 2
    t2 = time.monotonic()
    left = deadline - t2
    flat = _flat_model(c, l, cnt_E)
    bound, status, bound_note = math.nan, "no time for MIP", ""
    if left > 0.25:
        fn = _ilp_hierarchical if hier else _ilp_flat
        row, _, b, status = fn(c, l, cnt_E, best, (0.3 if lns_ok else 0.9) * left)
        bound = b
        if row is not None:
            polished = local_search_layer(s, l, topo, row, deadline=deadline, **kw)
            o = _layer_objective(c, l, polished)
            if o < best_obj - 1e-12:
                best, best_obj = polished, o
                src = "ilp" if np.array_equal(polished, row) else "ilp+polish"
    info["mip_s"] = time.monotonic() - t2
    # phase 3, exact MIP neighbourhood search over rank pairs (lns.py) with the rest of the budget
    t3 = time.monotonic()
    if lns_ok and deadline - t3 > 0.1:
        row, lns_info = lns_layer(s.topk_ids_TLK[:, l], best, srank, topo.send_weight_R, _fetch_ER(c, l),
                                  c.load_weight, lambda r: _layer_objective(c, l, r), deadline, c.solver,
                                  max_free=6, sub_time_s=0.5, seed=1000 + l)
        o = _layer_objective(c, l, row)
        if o < best_obj - 1e-12:
            best, best_obj, src = row, o, src + "+lns"
        info.update(lns=lns_info)
    info["lns_s"] = time.monotonic() - t3
    # phase 4, the bound: never silently missing. The flat LP relaxation (not time-limited) is
    # always solved. Flat path: the larger of it and the MIP's dual bound (a MIP stopped before
    # its root reports a trivial one); hierarchical: the two-stage split proves nothing about the
    # flat model, so the flat LP relaxation is the bound.
    t4 = time.monotonic()
    lp = solve_layer_model(flat, relax=True, time_limit_s=LP_BOUND_TIME_S, solver=c.solver).bound
    if hier:
        bound, bound_note = lp, "flat LP relaxation (the hierarchical split proves no bound)"
    elif not math.isfinite(bound) or (math.isfinite(lp) and lp >= bound):
        bound, bound_note = lp, "LP relaxation" + ("" if left > 0.25 else " (no time for the MIP)")
    else:
        bound_note = "MIP dual bound"
    if not math.isfinite(bound):
        bound_note = "none: LP relaxation failed"
    hold = holders_ER(best, srank, E, R)
    mobj = model_objective(flat, hold)
    info.update(status=status, bound=min(bound, mobj) if math.isfinite(bound) else bound, bound_kind=bound_note,
                model_objective=mobj, bound_s=time.monotonic() - t4, hierarchical=bool(hier), source=src,
                objective=best_obj, improved_by_mip=warm_obj - best_obj > 1e-12,
                mip_improvement=warm_obj - best_obj)
    return best, info


def solve_placement(stats: RoutingStats, topology: Topology, method: str = "ilp", *,
                    current: Placement | None = None, time_limit_s: float = 10.0,
                    load_weight: float = 1.0, migration_weight: float = 0.0, expert_bytes: float = 1.0,
                    num_pairs: int = 400, mip_gap: float = 1e-4, solver: str | None = None,
                    hierarchical: bool | None = None, balance_cap: float | None = None) -> SolveResult:
    """Place every layer's experts with ``method`` (one of METHODS) within ``time_limit_s`` in
    total (for "ilp", the convergent local search and the LP bound may exceed it: module docstring), minimising the cost model's objective (cost.py). ``current``: the placement in use
    (migration term, extra warm start). ``balance_cap``: optional hard cap on the ILP's busiest
    rank, as a multiple of the mean rank load. Returns a :class:`SolveResult`."""
    if method not in METHODS:
        raise PlacementError(f"method ({method!r}) must be one of {', '.join(METHODS)}")
    if time_limit_s <= 0:
        raise PlacementError(f"time_limit_s ({time_limit_s}) must be > 0")
    if load_weight < 0 or migration_weight < 0 or expert_bytes < 0:
        raise PlacementError("load_weight, migration_weight and expert_bytes must be >= 0")
    if balance_cap is not None and balance_cap < 1.0:
        raise PlacementError(f"balance_cap ({balance_cap}) must be >= 1 (a multiple of the mean load)")
    topology.check_experts(stats.num_experts)
    L, E, R = stats.num_layers, stats.num_experts, topology.num_ranks
    t0 = time.monotonic()
    if method in ("contiguous", "round_robin"):
        ctor = Placement.contiguous if method == "contiguous" else Placement.round_robin
        p = ctor(L, E, R, topology.slots_per_rank)
        infos = [{"layer": l, "status": "heuristic"} for l in range(L)]
    else:
        ctx = _Ctx(stats, topology, None if current is None else current.phy2log_LS, load_weight,
                   migration_weight, expert_bytes, num_pairs, mip_gap, solver or default_solver(),
                   hierarchical, balance_cap)
        if current is not None and (current.slots_per_rank != topology.slots_per_rank or current.num_layers != L
                                    or current.num_experts != E):
            raise PlacementError(f"current {current!r} does not match the statistics / topology")
        rows, infos = [], []
        for l in range(L):
            deadline = t0 + time_limit_s * (l + 1) / L
            row, info = _solve_layer(ctx, l, method, deadline)
            rows.append(row)
            infos.append(info)
        p = Placement(np.stack(rows), topology.slots_per_rank, E)
    elapsed = time.monotonic() - t0
    cost = evaluate(stats, p, topology, current=current, load_weight=load_weight,
                    migration_weight=migration_weight, expert_bytes=expert_bytes)
    if method == "ilp":
        bound = float(sum(i["bound"] for i in infos))
        mobj = float(sum(i["model_objective"] for i in infos))
        gap = (mobj - bound) / abs(mobj) if mobj else 0.0
        status = "optimal" if all(i["status"] == "optimal" for i in infos) else "feasible"
        solver_name = ctx.solver
    else:
        bound = mobj = gap = math.nan
        status, solver_name = "heuristic", "none"
    return SolveResult(p, cost, method, solver_name, status, bound, mobj, gap, elapsed, tuple(infos))
