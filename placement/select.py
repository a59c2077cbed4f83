"""Placement chosen by validation inside the statistics window, not by fit (``method="validated"``).

Owns: choosing per layer by the validation score, the refit decision, the validation score of
any placement on the same split (:func:`validation_scores`), and uneven slots against replicas
(:func:`select_slots`). The time split is folds.py's (:func:`time_folds`), the candidates
recipes.py's (:class:`Recipe`, :func:`default_recipes`, :func:`run_recipe`).

Why: on small windows the pipeline's exact search overfits: what it wins on the fitted tokens it
loses on the next ones (issue 26). So:

1. **Split by time.** The newest ``val_fraction`` of the window validates, the older part fits;
   with ``step_T`` (stats.py) the cuts fall on step boundaries. With enough tokens the newest part
   is cut into up to ``folds`` blocks (rolling origin: fold j fits on everything before block j).
   A window too small for that (fewer than ``MIN_FIT_TOKENS`` / ``MIN_VAL_TOKENS`` rows, or one
   step) is not validated: the first recipe fits the whole window and the report says so
   (``val_score`` nan).
2. **Candidates** (each a :class:`Recipe`, run on each fold's fit part within a share of the time
   budget, in this order): the pipeline at the asked load weight, **Mt-KaHyPar** when ``mtkahypar``
   imports (mtk.py), the pipeline at 0, half and twice the load weight and with another seed,
   **bagging** (the pipeline on ``BAG_RESAMPLES`` bootstrap resamples of the fit tokens; per layer,
   the resample answer best on average over all resamples) and greedy. A recipe may also fit on
   the newest share of the fit part only (``Recipe.window``); none of the defaults does: on the
   shared traces that chased the validation block's local regime and lost on later tokens.
3. **Choose per layer** the candidate with the lowest validation objective (the cost model's
   objective at the asked load weight, mean over folds). It replaces the first recipe (the asked
   method) only when it wins by more than ``SELECT_Z`` standard errors of the paired per-token
   objective difference (cost.token_objective_T: sends, and the busiest rank's load split over
   its tokens) on the last validation block: with a dozen candidates and a few hundred
   validation tokens, the best-looking one is partly luck (winner's curse).
4. **Refit.** Where validation keeps the asked method, it is refitted on the whole window (whose
   newest tokens are the freshest of all) with every second the substitutes leave: the answer
   the method alone would give, with less time. A substitute is refitted by evidence: it is run
   again on the last fold's fit part less its newest block ("lagged"), and refitted on the whole
   window unless the lagged fit scores better on the validation block than the full fit part by
   more than ``SELECT_Z`` standard errors (fresher tokens hurt); then the validated answer itself
   is returned. When the time left pays for one run only, the refit runs without the check; when
   not even that, the validated answer stands. ``LayerReport.refit`` says which. (The lagged
   check once guarded the asked method too; on the OLMoE trace it kept the fold's answer, fitted
   on three quarters of the window with a third of the time, and lost up to 0.25 sends/token to
   the method alone on later tokens: the asked method needs no evidence to be itself.)

Every answer is scored by cost.py's :func:`evaluate`. Time: ``CANDIDATE_SHARE`` of the budget
for the candidates (all folds; the first gets ``FIRST_SHARE`` of it; a recipe whose least cost,
the pipeline's convergent heuristics as last measured, exceeds what is left is skipped),
``REFIT_CHECK_SHARE`` for the lagged fits, the rest for the refits. Deterministic for a seed
unless a pipeline phase hits its time cap (pipeline.py) or a recipe is skipped for time.
"""

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from placement.cost import evaluate, token_objective_T
from placement.domains import FaultDomains, domain_vector
from placement.folds import MAX_FOLDS, MIN_FIT_TOKENS, VAL_FRACTION, Fold, time_folds
from placement.ilp import default_solver
from placement.methods import DEFAULT_RESTARTS, METHODS
from placement.placement import Placement
from placement.recipes import BAG_RESAMPLES, MIN_SOLVE_S, Recipe, SelectContext, default_recipes, run_recipe
from placement.result import LayerReport, SolveResult
from placement.stats import RoutingStats
from placement.topology import Topology

FOLDS_MIN_S = 4.0  # seconds per layer below which one fold is used (each fold runs every candidate)
CANDIDATE_SHARE = 0.5  # of the time budget: all candidates on all folds
REFIT_CHECK_SHARE = 0.1  # of the time budget: the lagged fits of the chosen recipes (the rest: refits)
SELECT_Z = 2.0  # a candidate beats the asked method by more than this many standard errors
FIRST_SHARE = 0.6  # of the candidate time: the first recipe (the asked method), the rest by weight
SLOTS_SHARE = 0.3  # of the time budget: select_slots' comparison of the two slot layouts
TOL = 1e-12


@dataclass
class _Scored:
    recipe: Recipe
    fit_FL: list  # per fold: fit-part objective [L]
    val_FL: list  # per fold: validation objective [L]
    last: Placement  # the answer on the last fold's fit part
    reports: tuple[LayerReport, ...] | None
    seconds: float = 0.0  # the least one fold's run costs: the pipeline's uncut heuristics, else its wall time
    asked: bool = False  # the first recipe (the asked method)


def _candidates(
    stats: RoutingStats, folds: list[Fold], recipes: tuple[Recipe, ...], c: SelectContext, end: float
) -> list[_Scored]:
    """Each recipe on every fold's fit part, scored on the fit part and the validation block. The
    first (the asked method) always runs, on ``FIRST_SHARE`` of the time; each other gets its
    weight's share of the time left, and is skipped when its least cost (the last pipeline
    recipe's convergent heuristics, which the clock does not cut; x resamples for bagging)
    exceeds what is left."""
    parts = [(stats.take_rows(f.fit_rows), stats.take_rows(f.val_rows)) for f in folds]
    out: list[_Scored] = []
    last_cost = 0.0
    for i, r in enumerate(recipes):
        left = end - time.monotonic()
        least = {"bagged": BAG_RESAMPLES * last_cost, "mtkahypar": 0.0}.get(r.method, last_cost if r.weight else 0.0)
        if i and (left < least or left <= 0):
            continue
        if i == 0:
            budget = max(left, 0.0) * (FIRST_SHARE if len(recipes) > 1 else 1.0)
        else:
            budget = max(left, 0.0) * r.weight / max(sum(q.weight for q in recipes[i:]), TOL) if r.weight else 0.0
        t = time.monotonic()
        s = None
        for j, (fit, val) in enumerate(parts):
            p, reps = run_recipe(r, fit, c, budget / len(parts), tag=j)
            if p is None:
                break
            s = s or _Scored(r, [], [], p, reps, asked=i == 0)
            s.fit_FL.append(c.score_L(fit, p))
            s.val_FL.append(c.score_L(val, p))
            s.last, s.reports = p, reps
        if s is not None:
            wall = (time.monotonic() - t) / len(parts)
            s.seconds = sum(rep.seconds("heuristics") for rep in s.reports) if s.reports else wall
            out.append(s)
        if r.weight and r.method in METHODS and s is not None:
            last_cost = s.seconds * len(parts)
    return out


def _refit(
    stats: RoutingStats, folds: list[Fold], chosen: dict, c: SelectContext, check_end: float, end: float
) -> dict[int, np.ndarray]:
    """Rows refitted on the whole window (4.): the asked method's layers always (what the method
    alone returns); a substitute's layers where fresher tokens did not hurt (the lagged check)."""
    groups: dict[str, tuple[_Scored, list[int]]] = {}
    for l, s in chosen.items():
        groups.setdefault(s.recipe.name, (s, []))[1].append(l)
    asked = [g for g in groups.values() if g[0].asked]
    helped = _lagged_check(stats, folds, [g for g in groups.values() if not g[0].asked], c, check_end, end)
    out: dict[int, np.ndarray] = {}
    todo = helped + asked  # the asked method last: it gets every second the substitutes left
    for n, (s, layers) in enumerate(todo):
        left_layers = sum(len(g[1]) for g in todo[n:])
        budget = max(end - time.monotonic(), 0.0) * len(layers) / left_layers
        if budget < s.seconds * len(layers) / stats.num_layers:
            continue  # no time for even its convergent heuristics: the validated answer stands
        sub = c.for_layers(layers)
        if c.migration_weight == 0:  # warm start from the validated rows: keep the basin validation chose
            sub = replace(sub, current=Placement(s.last.phy2log_LS[layers], s.last.slots_per_rank, s.last.num_experts))
        p, _ = run_recipe(s.recipe, stats.select_layers(layers), sub, budget, tag=100)
        assert p is not None  # a recipe that ran before (or the pipeline) answers
        out.update({l: p.phy2log_LS[i] for i, l in enumerate(layers)})
    return out


def _lagged_check(
    stats: RoutingStats, folds: list[Fold], groups: list, c: SelectContext, check_end: float, end: float
) -> list[tuple[_Scored, list[int]]]:
    """The substitutes' layers to refit: the recipe run again on the last fold's fit part less its
    newest block ("lagged") must not score significantly better on the validation block than the
    full fit part (fresher tokens did not hurt). No time for the check: refit; no time for the
    refit either: the validated answer stands."""
    last = folds[-1]
    n_block = len(last.val_rows)
    lag_rows = last.fit_rows[: len(last.fit_rows) - n_block]
    if len(lag_rows) < MIN_FIT_TOKENS or not groups:
        return []
    lagged, val = stats.take_rows(lag_rows), stats.take_rows(last.val_rows)
    helped: list[tuple[_Scored, list[int]]] = []
    for n, (s, layers) in enumerate(groups):
        cost = s.seconds * len(layers) / stats.num_layers
        if end - time.monotonic() < cost:
            continue  # no time to refit: the validated answer stands
        if end - time.monotonic() < 2 * cost:
            helped.append((s, layers))  # time for the refit only: refit (no evidence that it hurts)
            continue
        budget = max(check_end - time.monotonic(), 0.0) / (len(groups) - n)
        sub = c.for_layers(layers)
        p, _ = run_recipe(s.recipe, lagged.select_layers(layers), sub, budget, tag=99)
        assert p is not None  # a recipe that ran before (or the pipeline) answers
        lag_val = sub.score_L(val.select_layers(layers), p)
        better = [
            l
            for i, l in enumerate(layers)
            if not _significantly_lower(lag_val[i], s.val_FL[-1][l], val, p, i, s.last, l, c)
        ]
        if better:
            helped.append((s, better))
    return helped


def _significantly_lower(
    obj_a: float, obj_b: float, val: RoutingStats, a: Placement, la: int, b: Placement, lb: int, c: SelectContext
) -> bool:
    """Objective ``obj_a`` of row ``a[la]`` below ``obj_b`` of ``b[lb]`` by more than ``SELECT_Z``
    standard errors of their paired per-token objective difference on ``val``'s layer ``lb``
    (cost.token_objective_T: link-weighted sends plus the load weight x the token's pairs on the
    busiest rank; a win bought by balance is as noisy as its load term, not as the sends)."""
    if obj_b - obj_a <= TOL:
        return False
    vs = val.select_layers([lb])

    def per_token(p: Placement, l: int) -> np.ndarray:
        one = Placement(p.phy2log_LS[[l]], p.slots_per_rank, p.num_experts)
        return token_objective_T(vs, one, c.topo, c.load_weight)

    d_T = per_token(b, lb) - per_token(a, la)
    se = float(d_T.std(ddof=1) / math.sqrt(d_T.size)) if d_T.size > 1 else math.inf
    return obj_b - obj_a > SELECT_Z * se


def _choose(l: int, scored: list[_Scored], last_val: RoutingStats, c: SelectContext) -> _Scored:
    """Layer l's candidate (module docstring, 3.)."""
    val_C = np.array([np.mean([v[l] for v in s.val_FL]) for s in scored])
    b = int(np.argmin(val_C))
    if b and _significantly_lower(val_C[b], val_C[0], last_val, scored[b].last, l, scored[0].last, l, c):
        return scored[b]
    return scored[0]


def _report(l: int, s: _Scored, scored: list[_Scored], refit: bool, val_tokens: int, objective: float) -> LayerReport:
    fit, val = float(np.mean([f[l] for f in s.fit_FL])), float(np.mean([v[l] for v in s.val_FL]))
    sel = tuple(
        (o.recipe.name, float(np.mean([f[l] for f in o.fit_FL])), float(np.mean([v[l] for v in o.val_FL])))
        for o in scored
    )
    base = s.reports[l] if s.reports else LayerReport(l, "validated", s.recipe.method, objective)
    return replace(
        base,
        layer=l,
        method="validated",
        source=f"{s.recipe.name}:{base.source}",
        objective=objective,
        fit_score=fit,
        val_score=val,
        val_tokens=val_tokens,
        selection=sel,
        refit=refit,
    )


def select_placement(
    stats: RoutingStats,
    topology: Topology,
    *,
    recipes: tuple[Recipe, ...] | None = None,
    method: str = "validated",
    current: Placement | None = None,
    time_limit_s: float = 10.0,
    load_weight: float = 1.0,
    migration_weight: float = 0.0,
    expert_bytes: float = 1.0,
    seed: int = 0,
    restarts: int | None = None,
    balance_cap: float | None = None,
    val_fraction: float = VAL_FRACTION,
    folds: int = MAX_FOLDS,
    fault_domain: str = "none",
) -> SolveResult:
    """Place every layer by validation inside the window (module docstring) within ``time_limit_s``.
    ``recipes``: the candidates (default: :func:`default_recipes` of ``method``); every candidate
    keeps ``fault_domain``'s rule (domains.py). Returns a :class:`SolveResult` whose layer reports
    carry the fit / validation scores of every candidate."""
    t0 = time.monotonic()
    domain_vector(topology, fault_domain)  # an unknown fault domain fails before any candidate runs
    recipes = recipes or default_recipes(method, load_weight)
    c = SelectContext(
        topology,
        current,
        load_weight,
        migration_weight,
        expert_bytes,
        int(seed),
        DEFAULT_RESTARTS if restarts is None else int(restarts),
        balance_cap,
        fault_domain,
    )
    if time_limit_s / max(stats.num_layers, 1) < FOLDS_MIN_S:
        folds = 1
    split = time_folds(stats, val_fraction, folds)
    if not split:  # too small to validate: the first recipe on the whole window, in sample
        return _in_sample(stats, recipes[0], c, time_limit_s, t0)
    return _validated(stats, split, recipes, c, time_limit_s, t0)


def _in_sample(stats: RoutingStats, recipe: Recipe, c: SelectContext, time_limit_s: float, t0: float) -> SolveResult:
    """A window too small to validate: ``recipe`` fitted on all of it, scored in sample."""
    p, reps = run_recipe(recipe, stats, c, time_limit_s)
    assert p is not None  # a recipe that ran before (or the pipeline) answers
    obj_L = c.score_L(stats, p)
    reports = tuple(
        replace(
            reps[l] if reps else LayerReport(l, "validated", recipe.method, obj_L[l]),
            method="validated",
            fit_score=float(obj_L[l]),
        )
        for l in range(stats.num_layers)
    )
    return _result(stats, p, c, reports, "in-sample (window too small to validate)", time.monotonic() - t0)


def _validated(
    stats: RoutingStats,
    split: list[Fold],
    recipes: tuple[Recipe, ...],
    c: SelectContext,
    time_limit_s: float,
    t0: float,
) -> SolveResult:
    """Candidates on the folds, the choice per layer, the refits (module docstring, 2.-4.)."""
    scored = _candidates(stats, split, recipes, c, t0 + CANDIDATE_SHARE * time_limit_s)
    last_val = stats.take_rows(split[-1].val_rows)
    chosen = {l: _choose(l, scored, last_val, c) for l in range(stats.num_layers)}
    refits = _refit(
        stats, split, chosen, c, t0 + (CANDIDATE_SHARE + REFIT_CHECK_SHARE) * time_limit_s, t0 + time_limit_s
    )
    rows = np.stack([refits.get(l, chosen[l].last.phy2log_LS[l]) for l in range(stats.num_layers)])
    p = Placement(rows, c.topo.slots_per_rank, stats.num_experts)
    obj_L = c.score_L(stats, p)
    val_tokens = int(np.mean([len(f.val_rows) for f in split]))
    reports = tuple(
        _report(l, chosen[l], scored, l in refits, val_tokens, float(obj_L[l])) for l in range(stats.num_layers)
    )
    return _result(stats, p, c, reports, "validated", time.monotonic() - t0)


def _result(
    stats: RoutingStats, p: Placement, c: SelectContext, reports: tuple[LayerReport, ...], status: str, elapsed: float
) -> SolveResult:
    cost = evaluate(
        stats,
        p,
        c.topo,
        current=c.current,
        load_weight=c.load_weight,
        migration_weight=c.migration_weight,
        expert_bytes=c.expert_bytes,
    )
    fd = FaultDomains.of(c.topo, c.fault_domain, stats.num_experts)
    homed = () if fd is None else fd.single_homed(p)
    nan = math.nan
    return SolveResult(p, cost, "validated", default_solver(), status, nan, nan, nan, elapsed, reports, homed)


def validation_scores(
    stats: RoutingStats,
    placement: Placement,
    topology: Topology,
    *,
    load_weight: float = 1.0,
    migration_weight: float = 0.0,
    expert_bytes: float = 1.0,
    current: Placement | None = None,
    val_fraction: float = VAL_FRACTION,
    folds: int = MAX_FOLDS,
) -> np.ndarray | None:
    """A fixed placement's objective per layer [L] on the validation blocks of the same split
    (mean over folds); None when the window is too small to validate."""
    split = time_folds(stats, val_fraction, folds)
    if not split:
        return None
    c = SelectContext(topology, current, load_weight, migration_weight, expert_bytes, 0, 0, None)
    return np.mean([c.score_L(stats.take_rows(f.val_rows), placement) for f in split], axis=0)


def uneven_slots(num_experts: int, num_ranks: int, ranks_per_node: int = 0) -> tuple[int, ...]:
    """``E // R`` slots per rank, one more on ``E % R`` ranks spread over the nodes (the first
    rank of each node, then the second, ...)."""
    rpn = ranks_per_node or num_ranks
    base, extra = divmod(num_experts, num_ranks)
    order = sorted(range(num_ranks), key=lambda r: (r % rpn, r // rpn))
    plus = set(order[:extra])
    return tuple(base + (r in plus) for r in range(num_ranks))


@dataclass(frozen=True)
class SlotChoice:
    """Uneven slots or replicas, chosen by validation."""

    topology: Topology
    result: SolveResult
    chosen: str  # "even" | "uneven" | "replicas"
    val_scores: tuple[tuple[str, float], ...]  # (option, validation objective summed over layers)


def select_slots(
    stats: RoutingStats,
    num_ranks: int,
    *,
    ranks_per_node: int = 0,
    inter_node_cost: float = 4.0,
    method: str = "validated",
    time_limit_s: float = 10.0,
    load_weight: float = 1.0,
    seed: int = 0,
    **kwargs,
) -> SlotChoice:
    """When the experts do not divide over the ranks: uneven slots (no replicas) or ``ceil(E / R)``
    slots (replicas of hot experts in the extra slots). The asked method's first recipe is fitted
    on the fit part on each layout (``SLOTS_SHARE`` of the budget in all) and scored on the newest
    block; replicas only when their validation objective is lower (a window too small to validate
    keeps uneven slots). The selection then runs on the chosen layout with the rest of the budget."""
    t0 = time.monotonic()
    E = stats.num_experts

    def topo(spr) -> Topology:
        return Topology(num_ranks, spr, ranks_per_node, inter_node_cost=inter_node_cost)

    kw = dict(method=method, load_weight=load_weight, seed=seed, **kwargs)
    if E % num_ranks == 0:
        t = topo(E // num_ranks)
        res = select_placement(stats, t, time_limit_s=time_limit_s, **kw)
        return SlotChoice(t, res, "even", (("even", res.val_score),))
    opts = {"uneven": topo(uneven_slots(E, num_ranks, ranks_per_node)), "replicas": topo(-(-E // num_ranks))}
    split = time_folds(stats, kwargs.get("val_fraction", VAL_FRACTION), 1)
    scores = {name: math.nan for name in opts}
    if split:
        fit, val = stats.take_rows(split[0].fit_rows), stats.take_rows(split[0].val_rows)
        first = (kwargs.get("recipes") or default_recipes(method, load_weight))[0]
        for name, t in opts.items():
            c = SelectContext(
                t,
                None,
                load_weight,
                kwargs.get("migration_weight", 0.0),
                kwargs.get("expert_bytes", 1.0),
                int(seed),
                DEFAULT_RESTARTS,
                kwargs.get("balance_cap"),
                kwargs.get("fault_domain", "none"),
            )
            p, _ = run_recipe(first, fit, c, SLOTS_SHARE * time_limit_s / len(opts))
            assert p is not None  # a recipe that ran before (or the pipeline) answers
            scores[name] = float(c.score_L(val, p).sum())
    pick = "replicas" if scores["replicas"] < scores["uneven"] - TOL else "uneven"  # nan compares False
    left = max(time_limit_s - (time.monotonic() - t0), MIN_SOLVE_S)
    res = select_placement(stats, opts[pick], time_limit_s=left, **kw)
    return SlotChoice(opts[pick], res, pick, tuple(scores.items()))
