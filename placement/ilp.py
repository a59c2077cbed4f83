"""The pairwise ILP for one layer (PuLP; HiGHS when importable, else the bundled CBC).

Owns: building and solving the per-layer pairwise model, warm start, reading the solver's proven
bound. The ILP pipeline (phases.py) uses it for statistics without per-token ids (aggregates only); with ids it
uses the exact hypergraph model of hyper_ilp.py instead.

Legend: E experts, R ranks (or nodes, in the first stage of the hierarchical split), P pairs.

Model (all coefficients per token, the pairwise cost model of cost.py restricted to P pairs):

    x[e, r] in {0, 1}      expert e has a replica on rank r;  sum_r x[e, r] = cnt[e]
                           sum_e x[e, r] = slots[r]
    y[p, r] in [0, 1]      pair p = (e, f) both on r:  y <= x[e, r],  y <= x[f, r]
    m >= 0                 makespan: m >= sum_e share[e] x[e, r]   (share = load / cnt / T)
    minimise  sum_{e,r} ((w[r] - min w) share[e] + mu fetch[e, r]) x[e, r]
              - sum_{p,r} w[r] q[p] y[p, r] + lambda m
with ``q[p] = coact[e, f] / (cnt[e] cnt[f]) / T`` on the P heaviest pairs. The constant
``min(w) * sum_e load[e] / T`` is kept out of the objective (HiGHS drops objective constants
and then misreports the gap) and added back to ``objective`` and ``bound`` afterwards.
Optional hard cap: ``sum_e share[e] x[e, r] <= cap`` (relative to the mean rank load).
Optional fault domains (domains.py): for each expert e to keep on two domains and each domain d,
``sum_{r in d} x[e, r] <= cnt[e] - 1`` (not every replica on one domain).
Star inequalities ``sum_{p containing e} y[p, r] <= (slots[r] - 1) x[e, r]`` (valid: e has at
most slots - 1 partners on r) tighten the LP relaxation where e has more pairs than that.
Symmetry breaking when ranks are interchangeable (equal slots and weights, no migration term,
no replicas): the i-th heaviest expert may only use ranks 0..i.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp

try:  # HiGHS through highspy; optional
    import highspy  # noqa: F401

    HAVE_HIGHS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_HIGHS = False


LP_BOUND_TIME_S = 120.0  # the LP relaxation that backs every bound is not cut by the MIP's limit


def default_solver() -> str:
    return "highs" if HAVE_HIGHS else "cbc"


@dataclass(frozen=True)
class IlpLayerResult:
    rank_sets: list  # per expert, the ranks holding it (sorted lists)
    objective: float  # model objective of the returned incumbent (constant added back)
    bound: float  # solver's proven lower bound on the model objective (constant added back)
    status: str  # "optimal" | "feasible" (time limit / gap) | "infeasible" | "no solution"
    solver: str
    solve_time_s: float


@dataclass(frozen=True)
class LayerModel:
    """Arrays describing one layer's ILP (per-token units)."""

    share_E: np.ndarray  # load per replica / T
    cnt_E: np.ndarray  # replica counts
    pairs_P2: np.ndarray  # [P, 2] expert pairs
    q_P: np.ndarray  # co-activation per token of each pair (divided by replica counts)
    w_R: np.ndarray  # send weight of each rank
    slots_R: np.ndarray
    fetch_ER: np.ndarray  # migration cost of placing e on r (bytes x migration weight)
    load_weight: float
    cap: float | None  # absolute cap on a rank's share sum, or None
    span: tuple[np.ndarray, np.ndarray] | None = None  # (domain_R [R], cover_E bool [E]) or None


def top_pairs(coact_EE: np.ndarray, cnt_E: np.ndarray, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_pairs`` heaviest pairs e < f by coact / (cnt_e cnt_f): ``pairs_P2``, ``weight_P``."""
    E = coact_EE.shape[0]
    iu, ju = np.triu_indices(E, 1)
    val = coact_EE[iu, ju] / (cnt_E[iu] * cnt_E[ju])
    keep = np.flatnonzero(val > 0)
    keep = keep[np.argsort(-val[keep], kind="stable")[: max(num_pairs, 0)]]
    return np.stack([iu[keep], ju[keep]], axis=1), val[keep]


def model_objective(m: LayerModel, hold_ER: np.ndarray) -> float:
    """The ILP objective of an assignment (constant included): for brute force and checks."""
    load_R = m.share_E @ hold_ER
    e, f = m.pairs_P2[:, 0], m.pairs_P2[:, 1]
    both_PR = hold_ER[e] * hold_ER[f]
    total = float(m.w_R @ (m.share_E @ hold_ER)) - float(m.q_P @ (both_PR @ m.w_R))
    return total + m.load_weight * float(load_R.max()) + float((m.fetch_ER * hold_ER).sum())


class _HiGHSWarm(pulp.HiGHS if HAVE_HIGHS else object):  # type: ignore[misc]
    """PuLP's highspy HiGHS with a MIP start from the variables' current values."""

    def __init__(self, warm: bool, **kw):
        super().__init__(**kw)
        self.warm = warm

    def callSolver(self, lp):
        if self.warm:
            vals = np.array([v.varValue if v.varValue is not None else 0.0 for v in lp.variables()])
            lp.solverModel.setSolution(len(vals), np.arange(len(vals), dtype=np.int32), vals)
        lp.solverModel.run()


def _build(m: LayerModel, symmetry: bool):
    E, R = len(m.share_E), len(m.w_R)
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    x = {(e, r): prob.add_variable(f"x_{e}_{r}", 0, 1, cat="Integer") for e in range(E) for r in range(R)}
    y = {(p, r): prob.add_variable(f"y_{p}_{r}", 0, 1) for p in range(len(m.q_P)) for r in range(R)}
    mk = prob.add_variable("makespan", 0)
    wmin = float(m.w_R.min())
    lin = [((m.w_R[r] - wmin) * m.share_E[e] + m.fetch_ER[e, r], x[e, r]) for e in range(E) for r in range(R)]
    terms = [(c, v) for c, v in lin if c != 0.0]
    terms += [(-m.w_R[r] * m.q_P[p], y[p, r]) for p in range(len(m.q_P)) for r in range(R)]
    prob += pulp.LpAffineExpression([(v, float(c)) for c, v in terms] + [(mk, float(m.load_weight))])
    for e in range(E):
        prob += pulp.lpSum(x[e, r] for r in range(R)) == int(m.cnt_E[e])
    for r in range(R):
        prob += pulp.lpSum(x[e, r] for e in range(E)) == int(m.slots_R[r])
        rank_load = pulp.LpAffineExpression([(x[e, r], float(m.share_E[e])) for e in range(E)])
        prob += rank_load - mk <= 0
        if m.cap is not None:
            prob += rank_load <= m.cap
    for p, (e, f) in enumerate(m.pairs_P2):
        for r in range(R):
            prob += y[p, r] - x[int(e), r] <= 0
            prob += y[p, r] - x[int(f), r] <= 0
    # star inequalities: e has at most slots[r] - 1 partners on r, and none unless it is there;
    # they cut the LP point x = slots / E, y = min(x) whenever e has more pairs than that
    inc: list[list[int]] = [[] for _ in range(E)]
    for p, (e, f) in enumerate(m.pairs_P2):
        inc[int(e)].append(p)
        inc[int(f)].append(p)
    for e in range(E):
        for r in range(R):
            if len(inc[e]) > m.slots_R[r] - 1:
                prob += (pulp.lpSum(y[p, r] for p in inc[e]) - float(m.slots_R[r] - 1) * x[e, r]) <= 0
    if m.span is not None:  # a covered expert's replicas are not all on one fault domain
        dom_R, cover_E = m.span
        for c in np.flatnonzero(cover_E).tolist():
            for d in np.unique(dom_R):
                prob += pulp.lpSum(x[c, int(r)] for r in np.flatnonzero(dom_R == d)) <= int(m.cnt_E[c]) - 1
    if symmetry:
        for i, e in enumerate(np.argsort(-m.share_E, kind="stable")[: R - 1]):
            for r in range(i + 1, R):
                x[int(e), r].upBound = 0
    return prob, x, y, mk


def _set_warm(m: LayerModel, x, y, mk, hold_ER: np.ndarray) -> None:
    for (e, r), v in x.items():
        v.setInitialValue(float(hold_ER[e, r]))
    for (p, r), v in y.items():
        e, f = m.pairs_P2[p]
        v.setInitialValue(float(hold_ER[e, r] * hold_ER[f, r]))
    mk.setInitialValue(float((m.share_E @ hold_ER).max()))


def _cbc_bound(log: str) -> float | None:
    for pat in (r"best possible\s+(-?[\d.eE+-]+)", r"Lower bound:\s+(-?[\d.eE+-]+)"):
        hits = re.findall(pat, log)
        if hits:
            return float(hits[-1])
    return None


def solve_layer_model(
    m: LayerModel,
    *,
    warm_ER: np.ndarray | None = None,
    time_limit_s: float = 10.0,
    mip_gap: float = 1e-4,
    solver: str | None = None,
    symmetry: bool = True,
    relax: bool = False,
) -> IlpLayerResult:
    """Solve one layer's model (``relax=True``: the LP relaxation only, for a bound)."""
    solver = solver or default_solver()
    if solver == "highs" and not HAVE_HIGHS:
        raise ValueError("solver 'highs' requested but highspy is not importable")
    if solver not in ("highs", "cbc"):
        raise ValueError(f"solver ({solver!r}) must be 'highs' or 'cbc'")
    symmetry = symmetry and ranks_interchangeable(m)
    if symmetry and warm_ER is not None:
        warm_ER = canonicalise(m, warm_ER)
    t0 = time.monotonic()
    prob, x, y, mk = _build(m, symmetry)
    if warm_ER is not None and not relax:
        _set_warm(m, x, y, mk, warm_ER)
    # PuLP's hand-over to the solver takes about as long as building: keep both inside the limit
    tl = max(float(time_limit_s) - 2.0 * (time.monotonic() - t0), 0.05)
    bound = _run(prob, solver, warm_ER is not None and not relax, relax, tl, mip_gap)
    if not relax and (bound is None or not math.isfinite(bound)):
        # stopped before the root relaxation finished: the LP relaxation still gives a proven bound
        lp = solve_layer_model(m, time_limit_s=LP_BOUND_TIME_S, solver=solver, symmetry=symmetry, relax=True)
        bound = lp.bound - float(m.w_R.min() * m.share_E @ m.cnt_E) if math.isfinite(lp.bound) else None
    return _read(m, prob, x, bound, None if relax else warm_ER, relax, solver, time.monotonic() - t0, mip_gap)


def _run(prob, solver: str, warm: bool, relax: bool, time_limit_s: float, mip_gap: float) -> float | None:
    """Solve ``prob``; the solver's proven bound (model units, constant left out; None: none)."""
    if solver == "highs":
        s = _HiGHSWarm(warm, msg=False, timeLimit=time_limit_s, gapRel=mip_gap, mip=not relax, threads=1)
        prob.solve(s)
        info = prob.solverModel.getInfo()
        return info.objective_function_value if relax else info.mip_dual_bound
    with tempfile.TemporaryDirectory() as td:
        log = Path(td) / "cbc.log"
        with warnings.catch_warnings():  # PuLP 3.3 flags its bundled CBC as deprecated for 4.0
            warnings.simplefilter("ignore", DeprecationWarning)
            s = pulp.PULP_CBC_CMD(
                msg=False,
                timeLimit=time_limit_s,
                gapRel=mip_gap,
                mip=not relax,
                warmStart=warm,
                logPath=str(log),
                threads=1,
            )
        prob.solve(s)
        text = log.read_text() if log.exists() else ""
    return _cbc_bound(text)


def _read(
    m: LayerModel,
    prob,
    x: dict,
    bound: float | None,
    warm_ER: np.ndarray | None,
    relax: bool,
    solver: str,
    elapsed: float,
    mip_gap: float,
) -> IlpLayerResult:
    """The result of a solved ``prob``: its incumbent (or the MIP start ``warm_ER`` when it has
    none of its own), the objective and the bound with the constant added back."""
    const = float(m.w_R.min() * m.share_E @ m.cnt_E)
    sol = prob.sol_status  # PITFALLS: prob.status says Optimal even after a time limit
    status = {1: "optimal", 2: "feasible", -1: "infeasible", -2: "unbounded"}.get(sol, "no solution")
    E, R = len(m.share_E), len(m.w_R)
    if sol not in (1, 2):
        if warm_ER is None:
            return IlpLayerResult([], math.nan, math.nan, status, solver, elapsed)
        # stopped before any incumbent of its own: the MIP start stands, with whatever bound exists
        obj = model_objective(m, warm_ER)
        b = bound + const if bound is not None and math.isfinite(bound) else math.nan
        return IlpLayerResult(
            [list(np.flatnonzero(warm_ER[e] > 0.5)) for e in range(E)],
            obj,
            min(b, obj),
            "warm start only",
            solver,
            elapsed,
        )
    obj = float(pulp.value(prob.objective)) + const
    if bound is None or not math.isfinite(bound):
        bound = obj if sol == 1 else math.nan  # an optimal LP relaxation is its own bound
    else:
        bound = min(float(bound) + const, obj)  # a lower bound never exceeds the incumbent
        if solver == "cbc" and sol == 1 and not relax:
            # CBC logs only intermediate "best possible" figures; "optimal" means closed to mip_gap
            bound = max(bound, obj - mip_gap * abs(obj))
    rank_sets = [[r for r in range(R) if (x[e, r].varValue or 0.0) > 0.5] for e in range(E)]
    return IlpLayerResult(rank_sets, obj, bound, status, solver, elapsed)


def canonicalise(m: LayerModel, hold_ER: np.ndarray) -> np.ndarray:
    """Relabel interchangeable ranks of a no-replica assignment so it satisfies the symmetry
    rule: ranks ordered by their heaviest expert (only valid when ranks are interchangeable)."""
    order = np.argsort(-m.share_E, kind="stable")
    rank_of = hold_ER.argmax(axis=1)
    seen: list[int] = []
    for e in order:
        if rank_of[e] not in seen:
            seen.append(int(rank_of[e]))
    seen += [r for r in range(hold_ER.shape[1]) if r not in seen]
    return hold_ER[:, seen]


def ranks_interchangeable(m: LayerModel) -> bool:
    return (
        np.allclose(m.w_R, m.w_R[0])
        and (m.slots_R == m.slots_R[0]).all()
        and not m.fetch_ER.any()
        and (m.cnt_E == 1).all()
        and m.span is None
    )
