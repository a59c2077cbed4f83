"""The candidates of the validated selection (select.py, 2.): how each produces a placement.

Owns: :class:`Recipe` and :func:`default_recipes` (the candidate set), :class:`SelectContext`
(the asked weights, seed and topology every candidate runs and is scored with) and
:func:`run_recipe` (one recipe on a fit part: a method of methods.py, bagging, or Mt-KaHyPar).

Legend: L layers, T tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from placement import mtk
from placement.baselines import local_search_layer
from placement.cost import evaluate
from placement.domains import FaultDomains
from placement.folds import newest
from placement.methods import METHODS, run_method
from placement.placement import Placement, PlacementError
from placement.result import LayerReport
from placement.stats import RoutingStats
from placement.topology import Topology

MIN_SOLVE_S = 0.05  # no candidate runs with less
BAG_RESAMPLES = 4  # bootstrap resamples of the fit tokens (bagging)
POLISH_SMALL = 0.3  # x the load weight: Mt-KaHyPar's rows descended with sends first (mtkahypar_ls)


@dataclass(frozen=True)
class Recipe:
    """One way of producing a placement from a fit part."""

    name: str
    method: str  # a method of methods.py (METHODS but "validated"), "bagged" or "mtkahypar"
    load_weight_factor: float = 1.0  # x the asked load weight
    seed_offset: int = 0
    window: float = 1.0  # share of the fit part (its newest tokens) it fits on
    weight: float = 1.0  # share of the candidate budget (0: fast, runs on what is left)
    polish: float | None = None  # Mt-KaHyPar only: swap descent from its rows at this x the load weight


def default_recipes(method: str, load_weight: float) -> tuple[Recipe, ...]:
    """The candidates of ``method``: the whole set for "validated", else that method alone (its
    answer is still judged and refitted by validation)."""
    if method != "validated":
        if method not in METHODS:
            raise PlacementError(f"method ({method!r}) must be one of {', '.join(METHODS)}")
        return (Recipe(method, method),)
    out = [Recipe("ilp", "ilp")]
    if mtk.available():
        out.append(Recipe("mtkahypar", "mtkahypar", weight=0.25))
        out.append(Recipe("mtkahypar_ls", "mtkahypar", weight=0.0, polish=POLISH_SMALL))
        if load_weight > 0:
            out.append(Recipe("mtkahypar_ls_lw", "mtkahypar", weight=0.0, polish=1.0))
    if load_weight > 0:
        out += [Recipe("ilp_lw0", "ilp", 0.0), Recipe("ilp_lw_half", "ilp", 0.5), Recipe("ilp_lw_x2", "ilp", 2.0)]
    out += [
        Recipe("ilp_seed1", "ilp", seed_offset=1),
        Recipe("bagged", "bagged", weight=2.0),
        Recipe("greedy", "greedy", weight=0.0),
    ]
    return tuple(out)


@dataclass(frozen=True)
class SelectContext:
    """What every candidate runs with and is scored by: the asked weights, seed and topology."""

    topo: Topology
    current: Placement | None
    load_weight: float
    migration_weight: float
    expert_bytes: float
    seed: int
    restarts: int
    balance_cap: float | None
    fault_domain: str = "none"  # domains.py: every candidate keeps its rule
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # Mt-KaHyPar rows by fit part

    def cur_row(self, l: int) -> np.ndarray | None:
        return None if self.current is None else self.current.phy2log_LS[l]

    def score_L(self, stats: RoutingStats, p: Placement) -> np.ndarray:
        """The cost model's objective per layer [L] at the asked weights."""
        return evaluate(
            stats,
            p,
            self.topo,
            current=self.current,
            load_weight=self.load_weight,
            migration_weight=self.migration_weight,
            expert_bytes=self.expert_bytes,
        ).objective_L

    def for_layers(self, layers: list[int]) -> "SelectContext":
        cur = self.current
        if cur is not None:
            cur = Placement(cur.phy2log_LS[layers], cur.slots_per_rank, cur.num_experts)
        return replace(self, current=cur)


def _bagged(fit: RoutingStats, c: SelectContext, budget_s: float, tag: int) -> tuple[Placement, None]:
    """Per layer, of the pipeline's answers on ``BAG_RESAMPLES`` bootstrap resamples of ``fit``,
    the one with the lowest mean objective over all the resamples."""
    rng = np.random.default_rng([c.seed, 7, tag])
    T = fit.num_tokens
    samples = [fit.take_rows(rng.integers(0, T, T)) for _ in range(BAG_RESAMPLES)]
    answers = [
        run_method(
            s,
            c.topo,
            "ilp",
            current=c.current,
            time_limit_s=max(budget_s / BAG_RESAMPLES, MIN_SOLVE_S),
            load_weight=c.load_weight,
            migration_weight=c.migration_weight,
            expert_bytes=c.expert_bytes,
            seed=c.seed,
            restarts=c.restarts,
            balance_cap=c.balance_cap,
            fault_domain=c.fault_domain,
        ).placement
        for s in samples
    ]
    mean_BL = np.array([np.mean([c.score_L(s, p) for s in samples], axis=0) for p in answers])
    pick_L = mean_BL.argmin(axis=0)
    rows = np.stack([answers[b].phy2log_LS[l] for l, b in enumerate(pick_L)])
    return Placement(rows, c.topo.slots_per_rank, fit.num_experts), None


def run_recipe(
    r: Recipe, fit: RoutingStats, c: SelectContext, budget_s: float, tag: int = 0
) -> tuple[Placement | None, tuple[LayerReport, ...] | None]:
    """The recipe's placement on ``fit`` (None: Mt-KaHyPar absent) and the pipeline's reports."""
    if r.window < 1.0:
        fit = newest(fit, r.window)
    if r.method == "bagged":
        return _bagged(fit, c, budget_s, tag)
    if r.method == "mtkahypar":
        return _mtkahypar(r, fit, c, budget_s)
    res = run_method(
        fit,
        c.topo,
        r.method,
        current=c.current,
        time_limit_s=max(budget_s, MIN_SOLVE_S),
        load_weight=c.load_weight * r.load_weight_factor,
        migration_weight=c.migration_weight,
        expert_bytes=c.expert_bytes,
        seed=c.seed + r.seed_offset,
        restarts=c.restarts,
        balance_cap=c.balance_cap,
        fault_domain=c.fault_domain,
    )
    return res.placement, res.layers


def _mtkahypar(r: Recipe, fit: RoutingStats, c: SelectContext, budget_s: float) -> tuple[Placement | None, None]:
    """Mt-KaHyPar's rows on ``fit`` (mtk.py; None when it is absent), then, with ``r.polish``, the
    swap descent of each row (baselines.local_search_layer, fault domains kept) on the objective at
    ``r.polish`` x the load weight: below 1 it spends sends only where they buy much balance, so
    the row keeps Mt-KaHyPar's sends nearly and sheds its busiest rank's load. The rows of one fit
    part are computed once (``c.memo``): the polished recipes reuse the plain one's."""
    end = time.monotonic() + max(budget_s, MIN_SOLVE_S)
    domains = FaultDomains.of(c.topo, c.fault_domain, fit.num_experts)
    ids_TLK = fit.topk_ids_TLK
    assert ids_TLK is not None  # validation needs per-token ids (checked by select_placement)
    rows = []
    for l in range(fit.num_layers):
        key = (fit.num_tokens, c.seed + r.seed_offset, hash(ids_TLK[:, l].tobytes()), hash(fit.load_LE[l].tobytes()))
        if key not in c.memo:
            c.memo[key] = mtk.mtk_row(
                ids_TLK[:, l], fit.load_LE[l], c.topo, seed=c.seed + r.seed_offset, deadline=end, domains=domains
            )
        row = c.memo[key]
        if row is None:
            return None, None
        if r.polish is not None:
            row = local_search_layer(
                fit,
                l,
                c.topo,
                row,
                cur_S=c.cur_row(l),
                load_weight=c.load_weight * r.polish,
                migration_weight=c.migration_weight,
                expert_bytes=c.expert_bytes,
                domains=domains,
            )
        rows.append(row)
    return Placement(np.stack(rows), c.topo.slots_per_rank, fit.num_experts), None
