"""Typed records a rank's training step hands to whoever drives it.

Owns: :class:`StepMetrics`, what one optimizer step reports (identical on every rank). It crosses
the process boundary (actor -> driver) as a frozen dataclass, not as a dict of string keys, so a
misspelt field fails where it is read, not silently in a dashboard.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moetrain.parallel.traffic import StepTraffic


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, averaged over ranks (the single-process model's values)."""

    step: int  # optimizer steps done after this one (1 after the first step)
    loss: float  # lm_loss + lbl + z_loss
    lm_loss: float
    lbl: float  # load-balancing loss (coefficient applied)
    z_loss: float  # router z-loss (coefficient applied)
    grad_norm: float  # global norm before clipping
    lr: float
    tokens: int  # tokens in the global batch
    # token rows sent to other ranks this step (all ranks, all MoE layers), as flat dedup dispatch
    # sends them (dropped pairs excluded; also under hierarchical dispatch: a routing statistic;
    # bytes are in ``traffic``), from the dispatch metadata (``SentRows``)
    offrank_sends: float
    load_LE: np.ndarray  # tokens routed to each expert of each MoE layer this step, [L, E]
    step_time_s: float
    nonfinite: tuple[str, ...] = ()  # quantities that were NaN/inf: the update was skipped
    # bytes sent this step (all ranks), by kind and link class (moetrain.parallel.traffic)
    traffic: StepTraffic = dataclasses.field(default_factory=StepTraffic.empty)
    world_size: int = 0  # ranks that took the step (an elastic run's group size changes); 0: not recorded

    @property
    def skipped(self) -> bool:
        """True when the step's update was not applied (a non-finite loss or gradient norm)."""
        return bool(self.nonfinite)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.step_time_s, 1e-9)

    def to_dict(self) -> dict:
        """JSON-able copy (``load_LE`` as nested lists)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["load_LE"] = np.asarray(self.load_LE).tolist()
        d["traffic"] = self.traffic.to_dict()
        return d
