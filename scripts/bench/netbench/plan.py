"""The placements scripts/bench/bench_multinode.py compares, solved from the warm run's routing.

Owns: the node topology of a layout (ranks of a node contiguous, as the worker group orders them),
the contiguous baseline, the topology-aware ILP (inter-node sends cost 1, intra-node ones
``INTRA_NODE_COST``), the cost model's inter-node token rows of each, the ILP's proven lower bound,
and the exact optimum from placement/exact.py where it applies (or the one line why not).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement import Placement, RoutingStats, Topology, evaluate, solve_placement
from placement.exact import exact_placement
from placement.placement import PlacementError

# Ranks of one node talk over loopback: nearly free next to a 100 Mbit/s link, but not zero, so the
# ILP still prefers fewer sends when the inter-node rows tie.
INTRA_NODE_COST = 0.05
# Weight of the busiest rank's load in the ILP objective (placement.load_weight). The project's
# default 1.0 makes the makespan term dominate at 64 experts / top-8: the node-level solve then
# returns a perfectly balanced placement with no fewer crossings (measured: 0.999 node crossings
# per token vs 0.815 at 0.1, imbalance 1.03).
LOAD_WEIGHT = 0.1


def node_topology(num_experts: int, num_ranks: int, ranks_per_node: int, intra: float = INTRA_NODE_COST) -> Topology:
    return Topology.for_experts(num_experts, num_ranks, ranks_per_node=ranks_per_node, intra_node_cost=intra,
                                inter_node_cost=1.0)


def inter_node_rows(stats: RoutingStats, placement: Placement, num_ranks: int, ranks_per_node: int) -> float:
    """Cost model: token rows that cross a node boundary per token and MoE layer (flat dispatch,
    dedup per rank), i.e. traffic with intra-node sends free and inter-node ones 1."""
    topo = node_topology(stats.num_experts, num_ranks, ranks_per_node, intra=0.0)
    return evaluate(stats, placement, topo).traffic


def node_level_ilp(stats: RoutingStats, num_nodes: int, ranks_per_node: int, time_limit_s: float, seed: int = 0):
    """The ILP for hierarchical dispatch, which crosses to a node once per token whatever ranks
    there hold its experts: solve with each node as one 'rank' (E / N slots, tokens' home ranks
    mapped to their nodes), then deal each node's experts to its ranks by load, heaviest first onto
    the least loaded rank (intra-node traffic is nearly free). Returns (placement, SolveResult)."""
    E, L = stats.num_experts, stats.num_layers
    node_stats = stats if stats.home_T is None else dataclasses.replace(stats, home_T=stats.home_T // ranks_per_node)
    res = solve_placement(node_stats, Topology.for_experts(E, num_nodes), method="ilp", time_limit_s=time_limit_s,
                          load_weight=LOAD_WEIGHT, seed=seed)
    node_LE = res.placement.expert_rank_LE()
    per_rank = E // (num_nodes * ranks_per_node)
    rank_LE = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        for node in range(num_nodes):
            experts = np.flatnonzero(node_LE[layer] == node)
            experts = experts[np.argsort(-stats.load_LE[layer, experts], kind="stable")]
            load, count = np.zeros(ranks_per_node), np.zeros(ranks_per_node, dtype=int)
            for e in experts:
                free = [r for r in range(ranks_per_node) if count[r] < per_rank]
                r = min(free, key=lambda j: load[j])
                rank_LE[layer, e] = node * ranks_per_node + r
                load[r] += stats.load_LE[layer, e]
                count[r] += 1
    return Placement.from_expert_rank(rank_LE, num_nodes * ranks_per_node), res


def node_crossings(stats: RoutingStats, placement: Placement, num_nodes: int, ranks_per_node: int) -> float:
    """Cost model for hierarchical dispatch: remote nodes each token needs, per token and layer."""
    node_LE = placement.expert_rank_LE() // ranks_per_node
    node_placement = Placement.from_expert_rank(node_LE, num_nodes)
    topo = Topology.for_experts(stats.num_experts, num_nodes)
    node_stats = stats if stats.home_T is None else dataclasses.replace(stats, home_T=stats.home_T // ranks_per_node)
    return evaluate(node_stats, node_placement, topo).sends


@dataclass(frozen=True)
class LayoutPlan:
    num_ranks: int
    ranks_per_node: int
    contiguous: Placement
    ilp: Placement
    rows_contiguous: float  # inter-node rows per token and layer (cost model, flat dispatch)
    rows_ilp: float
    ilp_bound: float  # the ILP's proven lower bound on its objective (weighted traffic), summed over layers
    ilp_objective: float
    ilp_status: str
    ilp_solve_s: float
    exact_rows: float | None  # the exact optimum of inter-node rows, None where exact.py does not apply
    exact_note: str
    ilp_node: Placement | None = None  # node-level ILP (hierarchical dispatch); None with one rank per node
    crossings: dict = dataclasses.field(default_factory=dict)  # {placement: remote nodes per token and layer}

    def write(self, folder: Path) -> dict[str, str]:
        """Placement JSON files for ``placement.initial``; returns {name: path}."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, p in (("contiguous", self.contiguous), ("ilp", self.ilp), ("ilp_node", self.ilp_node)):
            if p is None:
                continue
            path = folder / f"placement_{self.num_ranks}x{self.ranks_per_node}_{name}.json"
            path.write_text(p.to_json())
            paths[name] = str(path)
        return paths

    def summary(self) -> dict:
        return {"num_ranks": self.num_ranks, "ranks_per_node": self.ranks_per_node,
                "model_internode_rows_per_token_contiguous": self.rows_contiguous,
                "model_internode_rows_per_token_ilp": self.rows_ilp, "ilp_status": self.ilp_status,
                "ilp_bound": self.ilp_bound, "ilp_objective": self.ilp_objective, "ilp_solve_s": self.ilp_solve_s,
                "exact_internode_rows_per_token": self.exact_rows, "exact_note": self.exact_note,
                "model_node_crossings_per_token": self.crossings}


def plan_layout(stats: RoutingStats, num_ranks: int, ranks_per_node: int, time_limit_s: float, seed: int = 0) -> LayoutPlan:
    E, L = stats.num_experts, stats.num_layers
    topo = node_topology(E, num_ranks, ranks_per_node)
    contiguous = Placement.contiguous(L, E, num_ranks)
    res = solve_placement(stats, topo, method="ilp", time_limit_s=time_limit_s, load_weight=LOAD_WEIGHT, seed=seed)
    rows_c = inter_node_rows(stats, contiguous, num_ranks, ranks_per_node)
    rows_i = inter_node_rows(stats, res.placement, num_ranks, ranks_per_node)
    exact_rows, note = None, ""
    try:
        best, _layers = exact_placement(stats, node_topology(E, num_ranks, ranks_per_node, intra=0.0),
                                        objective="traffic")
        exact_rows = inter_node_rows(stats, best, num_ranks, ranks_per_node) if best is not None else None
        note = "placement/exact.py dynamic programme (proven optimum)"
    except PlacementError as exc:
        note = f"exact optimum not computed: {exc}"
    nodes = num_ranks // ranks_per_node
    ilp_node = node_level_ilp(stats, nodes, ranks_per_node, time_limit_s, seed)[0] if ranks_per_node > 1 else None
    crossings = {name: node_crossings(stats, p, nodes, ranks_per_node)
                 for name, p in (("contiguous", contiguous), ("ilp", res.placement), ("ilp_node", ilp_node))
                 if p is not None}
    return LayoutPlan(num_ranks, ranks_per_node, contiguous, res.placement, rows_c, rows_i, float(res.bound),
                      float(res.model_objective), res.status, float(res.solve_time_s), exact_rows, note,
                      ilp_node, crossings)
