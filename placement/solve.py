"""The single entry point: ``solve_placement(stats, topology, method=...) -> SolveResult``.

Owns: the public signature and the dispatch between the two kinds of solve. Side-effect free
and picklable results (result.py), so moetrain can call it from a Ray task.

- ``method`` "ilp", "greedy", "local_search", "contiguous", "round_robin": methods.py runs that
  method over every layer within one time budget; "ilp" is the pipeline of pipeline.py (its
  phases, time shares and determinism are documented there).
- ``method="validated"``: placement/select.py's selection. The methods above are its candidates,
  fitted on the older part of the window and chosen per layer on its newest tokens (fit and
  validation scores in ``LayerReport.fit_score`` / ``val_score`` / ``selection``).

The import graph is one way: solve -> select -> methods and solve -> methods (select runs its
candidates through :func:`~placement.methods.run_method`, never back through this module).
"""

from __future__ import annotations

from typing import Any

from placement.methods import DEFAULT_MAX_HYPEREDGES, DEFAULT_RESTARTS, METHODS, check_args, run_method
from placement.placement import Placement
from placement.result import LayerReport, SolveResult
from placement.select import select_placement
from placement.stats import RoutingStats
from placement.topology import Topology

__all__ = ["DEFAULT_MAX_HYPEREDGES", "DEFAULT_RESTARTS", "METHODS", "LayerReport", "SolveResult", "solve_placement"]


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
    fault_domain: str = "none",
) -> SolveResult:
    """Place every layer's experts with ``method`` (one of METHODS) within ``time_limit_s`` in
    total, minimising the cost model's objective (cost.py); for "ilp" the convergent local search
    and the pairwise LP bound may run past it (pipeline.py). ``current``: the placement in use
    (migration term, extra warm start). ``seed`` / ``restarts``: the ILP pipeline's random choices
    and its tabu restarts (same seed, same answer). ``max_hyperedges`` / ``num_pairs``: hyperedges
    of the exact ILP (hyper_ilp.py) / pairs of the pairwise ILP (aggregates only). ``balance_cap``:
    optional hard cap on the busiest rank, a multiple of the mean rank load (the MIPs and the
    exact phase obey it; no row over it replaces one within it). ``fault_domain`` ("none" |
    "node" | "rank", domains.py): as many experts per layer on two fault domains as the slots
    allow, the hottest first (``SolveResult.single_homed`` lists the others)."""
    check_args(method, time_limit_s, load_weight, migration_weight, expert_bytes, balance_cap, restarts, max_hyperedges)
    common: dict[str, Any] = dict(
        current=current,
        time_limit_s=time_limit_s,
        load_weight=load_weight,
        migration_weight=migration_weight,
        expert_bytes=expert_bytes,
        seed=seed,
        restarts=restarts,
        balance_cap=balance_cap,
        fault_domain=fault_domain,
    )
    if method == "validated":  # select.py runs methods.py's methods as its candidates
        return select_placement(stats, topology, **common)
    return run_method(
        stats,
        topology,
        method,
        **common,
        max_hyperedges=max_hyperedges,
        num_pairs=num_pairs,
        mip_gap=mip_gap,
        solver=solver,
        hierarchical=hierarchical,
    )
