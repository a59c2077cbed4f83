"""Expert placement for Mixture-of-Experts training: statistics, one cost model, an ILP and
baselines. Pure numpy + PuLP (HiGHS through highspy when importable). No torch, no Ray.

    stats = load_routing("trace.npz")
    topo = Topology(num_ranks=4, slots_per_rank=15)
    result = solve_placement(stats, topo, method="ilp", time_limit_s=10)
    evaluate(stats, result.placement, topo).sends
"""

from placement.cost import CostBreakdown, evaluate
from placement.placement import Placement, PlacementError
from placement.select import SlotChoice, select_placement, select_slots
from placement.solve import METHODS, LayerReport, SolveResult, solve_placement
from placement.stats import RoutingStats, StatsError, from_aggregates, from_topk_ids, load_routing, split_tokens
from placement.topology import Topology, TopologyError

__all__ = [
    "CostBreakdown",
    "LayerReport",
    "METHODS",
    "Placement",
    "PlacementError",
    "RoutingStats",
    "SlotChoice",
    "SolveResult",
    "StatsError",
    "Topology",
    "TopologyError",
    "evaluate",
    "from_aggregates",
    "from_topk_ids",
    "load_routing",
    "select_placement",
    "select_slots",
    "solve_placement",
    "split_tokens",
]
