"""The placements scripts/bench_multinode.py compares, solved from the warm run's routing.

Owns: the node topology of a layout (ranks of a node contiguous, as the worker group orders them),
the contiguous baseline, the topology-aware ILP (inter-node sends cost 1, intra-node ones
``INTRA_NODE_COST``), the cost model's inter-node token rows of each, the ILP's proven lower bound,
and the exact optimum from placement/exact.py where it applies (or the one line why not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from placement import Placement, RoutingStats, Topology, evaluate, solve_placement
from placement.exact import exact_placement
from placement.placement import PlacementError

# Ranks of one node talk over loopback: nearly free next to a 100 Mbit/s link, but not zero, so the
# ILP still prefers fewer sends when the inter-node rows tie.
INTRA_NODE_COST = 0.05


def node_topology(num_experts: int, num_ranks: int, ranks_per_node: int, intra: float = INTRA_NODE_COST) -> Topology:
    return Topology.for_experts(num_experts, num_ranks, ranks_per_node=ranks_per_node, intra_node_cost=intra,
                                inter_node_cost=1.0)


def inter_node_rows(stats: RoutingStats, placement: Placement, num_ranks: int, ranks_per_node: int) -> float:
    """Cost model: token rows that cross a node boundary per token and MoE layer (flat dispatch,
    dedup per rank), i.e. traffic with intra-node sends free and inter-node ones 1."""
    topo = node_topology(stats.num_experts, num_ranks, ranks_per_node, intra=0.0)
    return evaluate(stats, placement, topo).traffic


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

    def write(self, folder: Path) -> dict[str, str]:
        """Placement JSON files for ``placement.initial``; returns {name: path}."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, p in (("contiguous", self.contiguous), ("ilp", self.ilp)):
            path = folder / f"placement_{self.num_ranks}x{self.ranks_per_node}_{name}.json"
            path.write_text(p.to_json())
            paths[name] = str(path)
        return paths

    def summary(self) -> dict:
        return {"num_ranks": self.num_ranks, "ranks_per_node": self.ranks_per_node,
                "model_internode_rows_per_token_contiguous": self.rows_contiguous,
                "model_internode_rows_per_token_ilp": self.rows_ilp, "ilp_status": self.ilp_status,
                "ilp_bound": self.ilp_bound, "ilp_objective": self.ilp_objective, "ilp_solve_s": self.ilp_solve_s,
                "exact_internode_rows_per_token": self.exact_rows, "exact_note": self.exact_note}


def plan_layout(stats: RoutingStats, num_ranks: int, ranks_per_node: int, time_limit_s: float, seed: int = 0) -> LayoutPlan:
    E, L = stats.num_experts, stats.num_layers
    topo = node_topology(E, num_ranks, ranks_per_node)
    contiguous = Placement.contiguous(L, E, num_ranks)
    res = solve_placement(stats, topo, method="ilp", time_limit_s=time_limit_s, seed=seed)
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
    return LayoutPlan(num_ranks, ranks_per_node, contiguous, res.placement, rows_c, rows_i, float(res.bound),
                      float(res.model_objective), res.status, float(res.solve_time_s), exact_rows, note)
