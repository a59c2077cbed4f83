"""The ILP pipeline of one layer (``method="ilp"``): its phases in order, each a function of
phases.py, every answer scored by the exact cost model before it is kept.

Owns: the order of the phases, their time shares, and the layer's :class:`LayerReport`.
methods.py runs it per layer, giving layer l an equal share of the time left (its deadline is
``now + (start + time_limit_s - now) / (L - l)``, so a layer whose MIP overran its limit, which
HiGHS can do by seconds, does not starve the next layer's search).

Legend: L layers, E experts, V vertices (expert replicas), R ranks, S slots.

1. **heuristics** (not cut by the deadline): greedy (EPLB-style) and the deterministic swap local
   search of ``method="local_search"`` from the same start, run to convergence. Descent never
   rises, so from here on the answer is <= greedy and <= local_search **by construction**.
1b. **exact** (per-token ids, one slot per expert, at most ``exact.MAX_WORK`` set scores: e.g. 16
   experts on 4 ranks, 20 on 4; exact.py): the set-partition programme gives the optimum of the
   traffic (+ migration) under a load cap, and walking the traffic / max-load front gives the
   optimum of the whole objective (0.3-0.6 s per layer at 16 experts). When the walk finishes
   the layer is done: the answer is proven optimal (``model`` "set_partition", bound = answer)
   and the phases below are skipped; when the clock cuts it, its best answer is offered and the
   phases below run.
2. **search**: ``restarts`` tabu searches (baselines.py) of ``TABU_ITERS`` moves each, the
   first from the best answer, the others from it perturbed by ``PERTURB_SWAPS`` random
   exchanges (seeded by ``seed`` and the layer); capped at ``SEARCH_SHARE`` of the layer budget.
3. **refine** (per-token ids without home ranks: refine.py's gains assume uniform origin):
   iterated FM on the exact hypergraph objective (refine.py): ejection chains of single-vertex
   moves from the best answer, then ``REFINE_ROUNDS`` rounds of ``REFINE_SWAPS`` seeded random
   exchanges + FM; capped at ``REFINE_SHARE`` of what is left. It reaches joint changes the
   swap neighbourhood misses (Qwen, 4 ranks, layer 3: 5 experts over 3 ranks, one token of km1
   below the answer of the 8 tabu restarts).
4. **mip**: with per-token ids, the *exact* hypergraph ILP (hyper_ilp.py: connectivity of each
   distinct top-k set, and origin when the statistics carry home ranks, exactly
   ``evaluate()``'s objective, replica counts of the warm start)
   on the ``max_hyperedges`` heaviest hyperedges, warm-started from the best answer, on
   ``MIP_SHARE`` of what is left (all of it when step 5 cannot run), then swap polish of its
   answer. With aggregates only, the pairwise ILP (pairwise.py, flat or hierarchical).
5. **lns**: the exact two-rank sub-MIP over rank pairs (lns.py), ``LNS_SWEEPS`` sweeps at most,
   with the rest of the budget (needs per-token ids).
6. **bound**: exact path, the exact ILP's proven bound on the *true* layer objective (at least
   the closed-form bound: every token reaches one rank, the busiest rank carries the mean load);
   pairwise path, as before, the larger of the MIP's dual bound and the flat LP relaxation of
   the *pairwise model* (``bound_kind`` says which).

Determinism: phases 2, 3 and 5 are bounded by counts (restarts x moves, rounds, sweeps) and
seeded; the MIPs run single-threaded with a fixed random seed and a node limit. The clock only
caps them, so two solves with the same seed return the same placement unless a phase hits its
time cap (``LayerReport.capped`` lists the phases that did).
"""

from __future__ import annotations

import time

import numpy as np

from placement.layer_context import LayerContext
from placement.phases import (
    Best,
    MipOutcome,
    exact_dp_applies,
    phase_exact_dp,
    phase_exact_mip,
    phase_heuristics,
    phase_lns,
    phase_pairwise_mip,
    phase_refine,
    phase_search,
)
from placement.result import LayerReport

SEARCH_SHARE = 0.75  # tabu restarts: at most this share of the layer budget
REFINE_SHARE = 0.5  # iterated FM: at most this share of what is left after the search
MIP_SHARE = 0.5  # the exact / pairwise MIP: this share of what is left after the refinement

Times = list[tuple[str, float]]


def solve_ilp_layer(c: LayerContext, l: int, deadline: float) -> tuple[np.ndarray, LayerReport]:
    """The pipeline on layer ``l`` (module docstring) by ``deadline``: its row [S] and report."""
    times: Times = []
    capped: list[str] = []
    t = time.monotonic()
    best = phase_heuristics(c, l)
    times.append(("heuristics", time.monotonic() - t))
    if exact_dp_applies(c):
        t = time.monotonic()
        done = phase_exact_dp(c, l, best, deadline)
        best.mark("exact_dp")
        times.append(("exact_dp", time.monotonic() - t))
        if done:  # proven optimal: the bound is the answer
            return best.row, _optimal_report(l, best, times)
        capped.append("exact_dp")
    _search_phases(c, l, best, deadline, times, capped)
    warm_obj = best.obj
    mip, lns = _mip_phases(c, l, best, deadline, times, capped)
    return best.row, _report(l, best, warm_obj, mip, lns, times, capped)


def _search_phases(c: LayerContext, l: int, best: Best, deadline: float, times: Times, capped: list[str]) -> None:
    """Phases 2 and 3: the tabu restarts, then (exact, uniform origin) the iterated FM."""
    t = time.monotonic()
    if phase_search(c, l, best, t + SEARCH_SHARE * max(deadline - t, 0.0)):
        capped.append("search")
    best.mark("tabu")
    times.append(("search", time.monotonic() - t))
    if c.exact and c.stats.home_T is None:  # refine.py scores uniform-origin sends only
        t = time.monotonic()
        if phase_refine(c, l, best, t + REFINE_SHARE * max(deadline - t, 0.0)):
            capped.append("refine")
        best.mark("refine")
        times.append(("refine", time.monotonic() - t))


def _mip_phases(
    c: LayerContext, l: int, best: Best, deadline: float, times: Times, capped: list[str]
) -> tuple[MipOutcome, tuple[int, int, int]]:
    """Phases 4 and 5: the exact (or pairwise) MIP, then the LNS with what is left."""
    lns_ok = c.exact and c.topo.num_ranks >= 2
    t = time.monotonic()
    share = MIP_SHARE if lns_ok else 1.0
    phase = phase_exact_mip if c.exact else phase_pairwise_mip
    mip = phase(c, l, best, share * (deadline - t))
    best.mark("mip")
    times.append(("mip", time.monotonic() - t))
    lns = (0, 0, 0)
    t = time.monotonic()
    if lns_ok and deadline - t > 0.1:
        lns = phase_lns(c, l, best, deadline)
        best.mark("lns")
        if time.monotonic() >= deadline - 0.05:
            capped.append("lns")
    times.append(("lns", time.monotonic() - t))
    if mip.model == "hypergraph":
        mip.model_objective = best.obj
        mip.bound = min(mip.bound, best.obj)
    return mip, lns


def _optimal_report(l: int, best: Best, times: Times) -> LayerReport:
    """The report of a layer the exact set-partition phase proved optimal."""
    return LayerReport(
        l,
        "ilp",
        best.source,
        best.obj,
        tuple(best.stages),
        best.obj,
        best.obj,
        best.obj,
        "exact set partition (exact.py): the optimum",
        "set_partition",
        "optimal",
        tuple(times),
    )


def _report(
    l: int,
    best: Best,
    warm_obj: float,
    mip: MipOutcome,
    lns: tuple[int, int, int],
    times: Times,
    capped: list[str],
) -> LayerReport:
    return LayerReport(
        l,
        "ilp",
        best.source,
        best.obj,
        tuple(best.stages),
        warm_obj,
        mip.bound,
        mip.model_objective,
        mip.bound_kind,
        mip.model,
        mip.status,
        tuple(times),
        tuple(capped),
        mip.hyperedges,
        lns,
        mip.hierarchical,
    )
