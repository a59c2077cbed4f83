"""Running one placement method over every layer within one time budget (every method but
``"validated"``, which is select.py's selection over these methods).

Owns: the method names (:data:`METHODS`), the argument checks, the per-layer time split, the
per-layer dispatch (greedy, local search, the ILP pipeline of pipeline.py; contiguous and
round-robin are :class:`Placement` constructors, repaired to the fault-domain rule when one is
asked: domains.py) and the :class:`SolveResult` of a run.
solve.py's :func:`~placement.solve.solve_placement` is the public entry point; select.py calls
:func:`run_method` for its candidates, so neither imports the other's caller.

Legend: L layers, E experts, R ranks, S slots.
"""

from __future__ import annotations

import math
import time

import numpy as np

from placement.baselines import greedy_layer, local_search_layer
from placement.cost import CostBreakdown, evaluate
from placement.domains import FaultDomains
from placement.ilp import default_solver
from placement.layer_context import LayerContext
from placement.phases import layer_objective
from placement.pipeline import solve_ilp_layer
from placement.placement import Placement, PlacementError
from placement.result import LayerReport, SolveResult
from placement.stats import RoutingStats
from placement.topology import Topology

METHODS = ("ilp", "greedy", "local_search", "contiguous", "round_robin", "validated")
DEFAULT_RESTARTS = 8
DEFAULT_MAX_HYPEREDGES = 200  # the exact ILP's root LP and cut rounds grow slow beyond a few hundred


def check_args(
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


def layer_deadline(end: float, l: int, num_layers: int) -> float:
    """Layer l's deadline: an equal share of the time left before ``end`` (none when past it)."""
    now = time.monotonic()
    return now + max(end - now, 0.0) / (num_layers - l)


def _solve_layer(c: LayerContext, l: int, method: str, deadline: float) -> tuple[np.ndarray, LayerReport]:
    if method == "ilp":
        return solve_ilp_layer(c, l, deadline)
    t = time.monotonic()
    if method == "greedy":
        row = greedy_layer(c.stats.load_LE[l], c.topo, c.domains)
    else:  # local_search, from greedy (or the current placement when that is better)
        start = greedy_layer(c.stats.load_LE[l], c.topo, c.domains)
        cur = None if c.cur_LS is None else c.cur_LS[l]
        if cur is not None and layer_objective(c, l, cur) < layer_objective(c, l, start) and c.row_ok(cur):
            start = cur.copy()
        row = local_search_layer(c.stats, l, c.topo, start, deadline=deadline, **c.ls_kwargs(l))
    obj = layer_objective(c, l, row)
    return row, LayerReport(l, method, method, obj, ((method, obj),), times=((method, time.monotonic() - t),))


def _run_layers(c: LayerContext, method: str, end: float) -> tuple[Placement, list[LayerReport]]:
    """Every layer by ``method``, layer l by :func:`layer_deadline` of ``end``."""
    L = c.stats.num_layers
    rows, reports = [], []
    for l in range(L):
        row, rep = _solve_layer(c, l, method, layer_deadline(end, l, L))
        rows.append(row)
        reports.append(rep)
    return Placement(np.stack(rows), c.topo.slots_per_rank, c.stats.num_experts), reports


def _check_current(current: Placement | None, stats: RoutingStats, topology: Topology) -> None:
    if current is not None and (
        current.slots_per_rank != topology.slots_per_rank
        or current.num_layers != stats.num_layers
        or current.num_experts != stats.num_experts
    ):
        raise PlacementError(f"current {current!r} does not match the statistics / topology")


def _baseline(method: str, stats: RoutingStats, topology: Topology, domains: FaultDomains | None) -> Placement:
    """Contiguous or round-robin; with fault domains each layer row repaired to their rule."""
    ctor = Placement.contiguous if method == "contiguous" else Placement.round_robin
    p = ctor(stats.num_layers, stats.num_experts, topology.num_ranks, topology.slots_per_rank)
    if domains is None or not domains.active:
        return p
    rows = [domains.repair(row, stats.load_LE[l]) for l, row in enumerate(p.phy2log_LS)]
    return Placement(np.stack(rows), p.slots_per_rank, p.num_experts)


def _result(
    p: Placement,
    cost: CostBreakdown,
    method: str,
    solver: str,
    elapsed: float,
    reports: list[LayerReport],
    domains: FaultDomains | None,
) -> SolveResult:
    """The run's result: for "ilp" the summed bounds, the gap and whether every layer is
    optimal; with fault domains the single-homed experts of each layer."""
    if method == "ilp":
        bound = float(sum(r.bound for r in reports))
        mobj = float(sum(r.model_objective for r in reports))
        gap = (mobj - bound) / abs(mobj) if mobj else 0.0
        status = "optimal" if all(r.status == "optimal" for r in reports) else "feasible"
    else:
        bound = mobj = gap = math.nan
        status = "heuristic"
    homed = () if domains is None else domains.single_homed(p)
    return SolveResult(p, cost, method, solver, status, bound, mobj, gap, elapsed, tuple(reports), homed)


def run_method(
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
    fault_domain: str = "none",
) -> SolveResult:
    """:func:`~placement.solve.solve_placement` for one of METHODS other than "validated" (the
    arguments are documented there)."""
    check_args(method, time_limit_s, load_weight, migration_weight, expert_bytes, balance_cap, restarts, max_hyperedges)
    if method == "validated":
        raise PlacementError('run_method runs one method: "validated" is select.py\'s selection')
    domains = FaultDomains.of(topology, fault_domain, stats.num_experts)
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
        domains if domains is not None and domains.active else None,
    )
    return _run(ctx, method, current, time_limit_s, domains)


def _run(
    c: LayerContext, method: str, current: Placement | None, time_limit_s: float, domains: FaultDomains | None
) -> SolveResult:
    """Every layer of ``c.stats`` by ``method`` within ``time_limit_s``, scored by the cost model."""
    stats, topology = c.stats, c.topo
    topology.check_experts(stats.num_experts)
    _check_current(current, stats, topology)
    t0 = time.monotonic()
    if method in ("contiguous", "round_robin"):
        p = _baseline(method, stats, topology, domains)
        reports = [LayerReport(l, method, method, math.nan) for l in range(stats.num_layers)]
        solver_name = "none"
    else:
        p, reports = _run_layers(c, method, t0 + time_limit_s)
        solver_name = c.solver if method == "ilp" else "none"
    elapsed = time.monotonic() - t0
    cost = evaluate(
        stats,
        p,
        topology,
        current=current,
        load_weight=c.load_weight,
        migration_weight=c.migration_weight,
        expert_bytes=c.expert_bytes,
    )
    return _result(p, cost, method, solver_name, elapsed, reports, domains)
