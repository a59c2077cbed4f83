"""What a solve returns: the per-layer report (:class:`LayerReport`) and the result
(:class:`SolveResult`). Frozen and picklable, so moetrain can receive them from a Ray task.

Owns: the two result types, shared by the ILP pipeline (pipeline.py), the method runner
(methods.py) and the validated selection (select.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from placement.cost import CostBreakdown
from placement.placement import Placement

TOL = 1e-12


@dataclass(frozen=True)
class LayerReport:
    """What happened in one layer: which stage's answer won, the fitted objective after each
    stage, the bound and its kind, and the seconds each phase took."""

    layer: int
    method: str
    source: str  # the stage whose answer is returned (e.g. "tabu", "exact_ilp+polish", "lns")
    objective: float  # fitted objective of the returned row (cost.py)
    stages: tuple[tuple[str, float], ...] = ()  # (stage, best fitted objective after it)
    warm_objective: float = math.nan  # best answer before the MIP phases (the MIP's warm start)
    bound: float = math.nan  # proven lower bound (nan: no ILP)
    model_objective: float = math.nan  # the bounded model's value of the returned row
    bound_kind: str = ""
    model: str = "none"  # "hypergraph" (exact) | "pairwise" | "none"
    status: str = "heuristic"  # the MIP's: "optimal" | "feasible" | "warm start only" | ...
    times: tuple[tuple[str, float], ...] = ()  # (phase, seconds)
    capped: tuple[str, ...] = ()  # phases stopped by the clock rather than their counts
    hyperedges: tuple[int, int] = (0, 0)  # (kept in the exact model, distinct in the layer)
    lns: tuple[int, int, int] = (0, 0, 0)  # (subproblems, proven optimal, improvements)
    hierarchical: bool = False
    # validated selection (select.py): the chosen candidate's objective on the fit part(s) and on
    # the newest tokens it did not see (mean over folds; nan: not validated), those tokens, every
    # candidate's (name, fit, validation) scores, and whether the answer was refitted on the window
    fit_score: float = math.nan
    val_score: float = math.nan
    val_tokens: int = 0
    selection: tuple[tuple[str, float, float], ...] = ()
    refit: bool = False

    @property
    def mip_improvement(self) -> float:
        """Fitted objective gained by the MIP phases over their warm start (>= 0)."""
        return self.warm_objective - self.objective if math.isfinite(self.warm_objective) else 0.0

    @property
    def improved_by_mip(self) -> bool:
        return self.mip_improvement > TOL

    def seconds(self, phase: str) -> float:
        return dict(self.times).get(phase, 0.0)


@dataclass(frozen=True)
class SolveResult:
    placement: Placement
    cost: CostBreakdown  # on the statistics given (exact when they hold per-token ids)
    method: str
    solver: str  # "highs" | "cbc" | "none"
    status: str  # "optimal" | "feasible" | "heuristic"
    bound: float  # sum over layers of the proven lower bounds (nan: no ILP)
    model_objective: float  # sum over layers of the bounded model's value of the answer
    gap: float  # (model_objective - bound) / |model_objective| (nan: no ILP)
    solve_time_s: float
    layers: tuple[LayerReport, ...] = field(default=())
    # with fault domains (domains.py), per layer the experts whose replicas all sit on one domain
    # (() when the solve had no fault domain)
    single_homed: tuple[tuple[int, ...], ...] = ()

    @property
    def fit_score(self) -> float:
        """Sum over layers of the fit-part objective (nan unless validated, select.py)."""
        return float(sum(r.fit_score for r in self.layers)) if self.layers else math.nan

    @property
    def val_score(self) -> float:
        """Sum over layers of the validation objective (nan unless validated, select.py)."""
        return float(sum(r.val_score for r in self.layers)) if self.layers else math.nan

    def summary(self) -> dict:
        return {
            "method": self.method,
            "solver": self.solver,
            "status": self.status,
            "bound": self.bound,
            "model_objective": self.model_objective,
            "gap": self.gap,
            "solve_time_s": self.solve_time_s,
            "fit_score": self.fit_score,
            "val_score": self.val_score,
            **self.cost.to_dict(),
        }
