"""Running one placement method over every layer within one time budget (every method but
``"validated"``, which is select.py's selection over these methods).

Owns: the method names (:data:`METHODS`), the argument checks, the per-layer time split, the
per-layer dispatch (greedy, local search, the ILP pipeline of pipeline.py; contiguous and
round-robin are :class:`Placement` constructors) and the :class:`SolveResult` of a run.
solve.py's :func:`~placement.solve.solve_placement` is the public entry point; select.py calls
:func:`run_method` for its candidates, so neither imports the other's caller.

Legend: L layers, E experts, R ranks, S slots.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from placement.baselines import greedy_layer, local_search_layer
from placement.cost import CostBreakdown, evaluate
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
        row = greedy_layer(c.stats.load_LE[l], c.topo)
    else:  # local_search, from greedy (or the current placement when that is better)
        start = greedy_layer(c.stats.load_LE[l], c.topo)
        if c.cur_LS is not None and layer_objective(c, l, c.cur_LS[l]) < layer_objective(c, l, start):
            start = c.cur_LS[l].copy()
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


def _result(
    p: Placement, cost: CostBreakdown, method: str, solver: str, elapsed: float, reports: list[LayerReport]
) -> SolveResult:
    """The run's result: for "ilp" the summed bounds, the gap and whether every layer is optimal."""
    if method == "ilp":
        bound = float(sum(r.bound for r in reports))
        mobj = float(sum(r.model_objective for r in reports))
        gap = (mobj - bound) / abs(mobj) if mobj else 0.0
        status = "optimal" if all(r.status == "optimal" for r in reports) else "feasible"
    else:
        bound = mobj = gap = math.nan
        status = "heuristic"
    return SolveResult(p, cost, method, solver, status, bound, mobj, gap, elapsed, tuple(reports))


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
) -> SolveResult:
    """:func:`~placement.solve.solve_placement` for one of METHODS other than "validated" (the
    arguments are documented there)."""
    check_args(method, time_limit_s, load_weight, migration_weight, expert_bytes, balance_cap, restarts, max_hyperedges)
    if method == "validated":
        raise PlacementError('run_method runs one method: "validated" is select.py\'s selection')
    topology.check_experts(stats.num_experts)
    _check_current(current, stats, topology)
    weights: dict[str, Any] = dict(
        load_weight=load_weight, migration_weight=migration_weight, expert_bytes=expert_bytes
    )
    t0 = time.monotonic()
    if method in ("contiguous", "round_robin"):
        ctor = Placement.contiguous if method == "contiguous" else Placement.round_robin
        p = ctor(stats.num_layers, stats.num_experts, topology.num_ranks, topology.slots_per_rank)
        reports = [LayerReport(l, method, method, math.nan) for l in range(stats.num_layers)]
        solver_name = "none"
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
        p, reports = _run_layers(ctx, method, t0 + time_limit_s)
        solver_name = ctx.solver if method == "ilp" else "none"
    elapsed = time.monotonic() - t0
    cost = evaluate(stats, p, topology, current=current, **weights)
    return _result(p, cost, method, solver_name, elapsed, reports)
