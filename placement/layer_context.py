"""What every per-layer step of a solve reads: the statistics, the topology, the current
placement and the solve's settings, in one frozen :class:`LayerContext`.

Owns: :class:`LayerContext`. Its own module so that methods.py (which builds it) and the phase
modules it calls (phases.py, pairwise.py) import it without importing each other.

Legend: L layers, S slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.domains import FaultDomains
from placement.stats import RoutingStats
from placement.topology import Topology


@dataclass(frozen=True)
class LayerContext:
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
    seed: int
    restarts: int
    max_hyperedges: int
    domains: FaultDomains | None = None  # the fault-domain rule when it constrains (domains.py)

    @property
    def exact(self) -> bool:
        return self.stats.topk_ids_TLK is not None

    def ls_kwargs(self, l: int) -> dict:
        return dict(
            load_weight=self.load_weight,
            migration_weight=self.migration_weight,
            expert_bytes=self.expert_bytes,
            cur_S=None if self.cur_LS is None else self.cur_LS[l],
            domains=self.domains,
        )

    def row_ok(self, row_S: np.ndarray) -> bool:
        """The row keeps the fault-domain rule (always, without one)."""
        return self.domains is None or self.domains.valid(row_S)
