"""The machine the experts are placed on: ranks, nodes, slots, link costs, token origin.

Owns: :class:`Topology` and its validation. Pure numpy.

Legend: R ranks, N nodes. ``node_of_rank[r]`` is the node of rank r (nodes numbered 0..N-1; on a
cluster the worker group reads it from where its ranks landed, each node's ranks contiguous). Nodes
may hold different numbers of ranks. ``ranks_per_node`` is the uniform shorthand: without a map,
ranks ``[n * ranks_per_node, (n + 1) * ranks_per_node)`` form node n; with a map it is the ranks
of every node when they are all equal, else 0.

- ``link_cost_RR[o, r]``: cost of sending one token from rank o to rank r: 0 on the diagonal,
  ``intra_node_cost`` inside a node, ``inter_node_cost`` across nodes.
- ``origin_R[o]``: fraction of tokens that originate on rank o (data-parallel slice; uniform by
  default). The cost model assumes where a token originates is independent of its routing.
- ``send_weight_R[r] = sum_o origin_R[o] * link_cost_RR[o, r]``: expected cost of one token
  having to reach rank r. Because origin is independent of routing, expected traffic is
  ``sum_r send_weight_R[r] * (tokens that need rank r)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


class TopologyError(ValueError):
    """An invalid topology (the message names the field)."""


@dataclass(frozen=True, eq=False)
class Topology:
    num_ranks: int
    slots_per_rank: tuple[int, ...]  # length R (an int is broadcast)
    ranks_per_node: int = 0  # 0 = all ranks on one node
    intra_node_cost: float = 1.0  # cost of one token sent to another rank of the same node
    inter_node_cost: float = 4.0  # cost of one token sent to a rank of another node
    origin_R: tuple[float, ...] = ()  # fraction of tokens starting on each rank; () = uniform
    node_of_rank: tuple[int, ...] = ()  # node of each rank, nodes 0..N-1; () = from ranks_per_node

    def __post_init__(self) -> None:
        R = int(self.num_ranks)
        if R < 1:
            raise TopologyError(f"num_ranks ({R}) must be >= 1")
        spr = self.slots_per_rank
        spr = (int(spr),) * R if isinstance(spr, (int, np.integer)) else tuple(int(s) for s in spr)
        if len(spr) != R:
            raise TopologyError(f"slots_per_rank has {len(spr)} entries for num_ranks={R}")
        if any(s < 1 for s in spr):
            raise TopologyError(f"slots_per_rank {spr} must all be >= 1")
        nodes, rpn = _node_map(R, int(self.ranks_per_node), self.node_of_rank)
        if not 0 <= self.intra_node_cost <= self.inter_node_cost:
            raise TopologyError(
                f"need 0 <= intra_node_cost ({self.intra_node_cost}) <= inter_node_cost ({self.inter_node_cost})"
            )
        origin = tuple(float(o) for o in self.origin_R) or (1.0 / R,) * R
        if len(origin) != R or min(origin) < 0 or not np.isclose(sum(origin), 1.0):
            raise TopologyError(f"origin_R must have {R} non-negative entries summing to 1, got {origin}")
        object.__setattr__(self, "num_ranks", R)
        object.__setattr__(self, "slots_per_rank", spr)
        object.__setattr__(self, "ranks_per_node", rpn)
        object.__setattr__(self, "origin_R", origin)
        object.__setattr__(self, "node_of_rank", nodes)

    @classmethod
    def uniform(
        cls,
        num_ranks: int,
        slots_per_rank: int | Sequence[int],
        ranks_per_node: int = 0,
        intra_node_cost: float = 1.0,
        inter_node_cost: float = 4.0,
    ) -> "Topology":
        return cls(
            num_ranks,
            slots_per_rank,  # type: ignore[arg-type]  # an int is broadcast
            ranks_per_node,
            intra_node_cost,
            inter_node_cost,
        )

    @classmethod
    def from_nodes(
        cls,
        node_of_rank: Sequence[int],
        slots_per_rank: int | Sequence[int],
        intra_node_cost: float = 1.0,
        inter_node_cost: float = 4.0,
    ) -> "Topology":
        """The topology of ranks that landed on ``node_of_rank`` (e.g. ``(0, 0, 1)``: two ranks on
        node 0, one on node 1)."""
        return cls(
            len(node_of_rank),
            slots_per_rank,  # type: ignore[arg-type]  # an int is broadcast
            0,
            intra_node_cost,
            inter_node_cost,
            node_of_rank=tuple(node_of_rank),
        )

    @classmethod
    def for_experts(cls, num_experts: int, num_ranks: int, slots_per_rank: int | None = None, **kwargs) -> "Topology":
        """Topology with ``slots_per_rank`` defaulting to ``ceil(E / R)``."""
        if num_ranks < 1:
            raise TopologyError(f"num_ranks ({num_ranks}) must be >= 1")
        spr = slots_per_rank if slots_per_rank else -(-num_experts // num_ranks)
        return cls(num_ranks, spr, **kwargs)  # type: ignore[arg-type]  # an int is broadcast (__post_init__)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    @property
    def ranks_N(self) -> np.ndarray:
        """Number of ranks on each node, [N]."""
        return np.bincount(self.node_R, minlength=self.num_nodes)

    @property
    def num_slots(self) -> int:
        return sum(self.slots_per_rank)

    @property
    def node_R(self) -> np.ndarray:
        """Node of each rank, [R]."""
        return np.asarray(self.node_of_rank, dtype=np.int64)

    @property
    def link_cost_RR(self) -> np.ndarray:
        node = self.node_R
        c = np.where(node[:, None] == node[None, :], self.intra_node_cost, self.inter_node_cost)
        np.fill_diagonal(c, 0.0)
        return c.astype(np.float64)

    @property
    def send_weight_R(self) -> np.ndarray:
        """Expected link cost of one token needing rank r, [R] (see module docstring)."""
        return np.asarray(self.origin_R) @ self.link_cost_RR

    @property
    def offrank_weight_R(self) -> np.ndarray:
        """Probability that a token needing rank r did not start there, [R]."""
        return 1.0 - np.asarray(self.origin_R)

    def check_experts(self, num_experts: int) -> None:
        """Raise if the slots cannot hold every expert once."""
        if self.num_slots < num_experts:
            raise TopologyError(
                f"{self.num_ranks} ranks x slots_per_rank {self.slots_per_rank} = "
                f"{self.num_slots} slots cannot hold {num_experts} experts"
            )

    def sub(self, ranks: Sequence[int]) -> "Topology":
        """The topology restricted to ``ranks`` (one node's ranks, for the hierarchical split);
        origin is renormalised over them and costs stay those of the parent."""
        idx = [int(r) for r in ranks]
        origin = np.asarray(self.origin_R)[idx]
        origin = origin / origin.sum() if origin.sum() > 0 else np.full(len(idx), 1.0 / len(idx))
        _, renumbered = np.unique(self.node_R[idx], return_inverse=True)  # nodes kept, in node order
        return Topology(
            len(idx),
            tuple(self.slots_per_rank[r] for r in idx),
            0,
            self.intra_node_cost,
            self.inter_node_cost,
            tuple(origin),
            node_of_rank=tuple(int(n) for n in renumbered),
        )

    def __repr__(self) -> str:
        nodes = (
            f"ranks_per_node={self.ranks_per_node}"
            if self.ranks_per_node
            else f"ranks per node={self.ranks_N.tolist()}"
        )
        return (
            f"Topology(ranks={self.num_ranks}, {nodes}, slots_per_rank={self.slots_per_rank}, "
            f"cost intra/inter={self.intra_node_cost}/{self.inter_node_cost})"
        )


def _node_map(R: int, ranks_per_node: int, node_of_rank: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """``(node_of_rank, ranks_per_node)`` normalised: the map from the uniform shorthand when no map
    is given; ranks_per_node the ranks of every node when all nodes hold as many, else 0."""
    if not node_of_rank:
        rpn = ranks_per_node or R
        if rpn < 1 or R % rpn:
            raise TopologyError(f"ranks_per_node ({rpn}) must divide num_ranks ({R})")
        return tuple(r // rpn for r in range(R)), rpn
    nodes = tuple(int(n) for n in node_of_rank)
    if len(nodes) != R:
        raise TopologyError(f"node_of_rank has {len(nodes)} entries for num_ranks={R}")
    if min(nodes) < 0 or set(nodes) != set(range(max(nodes) + 1)):
        raise TopologyError(f"node_of_rank {nodes} must number its nodes 0..N-1 with none left out")
    counts = set(np.bincount(nodes).tolist())
    rpn = counts.pop() if len(counts) == 1 else 0
    if ranks_per_node and ranks_per_node != rpn:
        raise TopologyError(f"ranks_per_node ({ranks_per_node}) does not match node_of_rank {nodes}")
    return nodes, rpn
