"""MIP large-neighbourhood search: re-split the experts of two ranks optimally, exact cost.

Owns: the exact two-rank sub-MIP (:func:`pair_model`, :func:`solve_pair_model`) and the
improvement loop over rank pairs (:func:`lns_layer`) that the ILP pipeline (``phases.py``) runs after the MIP.

Legend: T tokens, K top-k, S slots, F free experts (the single-replica experts of ranks a and b).

Why: the flat ILP (ilp.py) optimises the *pairwise* model over the top pairs, whose LP bound is
weak and whose optimum is not the exact (dedup) optimum, so on its own it rarely beats an exact
swap local search. The sub-MIP here is *exact* for the cost model of cost.py (per-token dedup,
link weights, exact busiest-rank load, migration) over a neighbourhood far larger than one swap:
every re-split of ranks a and b, i.e. all multi-expert exchanges between them.

Sub-model for ranks a, b (other ranks, and replicated experts' slots, stay fixed; so the
``t mod c`` replica rule of cost.py sends every token to the same replica slots as before):

    x[e] in {0, 1}     free expert e goes to rank a (1) or b (0);  sum_e x[e] = free slots of a
    na[g] >= x[e]      group g of tokens (same free experts G, same fixed needs) needs a,
    nb[g] >= 1 - x[e]  for every e in G (only groups with |G| >= 2 and no fixed need there;
                       |G| = 1 is linear in x, a fixed need makes the cost constant)
    m >= fixed_a + sum_e load[e] x[e],  m >= fixed_b + sum_e load[e] (1 - x[e]),  m >= max other
    minimise  sum_e lin[e] x[e] + w_a sum_g cnt[g] na[g] + w_b sum_g cnt[g] nb[g] + lambda m

(per token; constants dropped, so model values are compared only with each other). With home
ranks (origin classes, cost.py) the groups are also split by origin o and use ``w[o, a]``,
``w[o, b]``. Every
candidate is checked on the exact evaluator before it is accepted, so the layer objective never
rises. Needs per-token ids; with aggregates only, ``lns_layer`` does nothing.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pulp

from placement.cost import virtual_ids
from placement.ilp import HAVE_HIGHS, _HiGHSWarm


@dataclass(frozen=True)
class PairModel:
    slots: np.ndarray  # [F] the free slots (indices into the layer row), a's first
    experts: np.ndarray  # [F] expert in each free slot now
    slots_a: int  # how many of the free slots are on rank a
    lin: np.ndarray  # [F] objective coefficient of x[e] (per token)
    sets_a: list  # local expert index arrays of the groups whose need on a is a variable
    wt_a: np.ndarray
    sets_b: list
    wt_b: np.ndarray
    load: np.ndarray  # [F] per-token load of each free expert
    fixed_a: float
    fixed_b: float
    m_floor: float  # busiest load among the other ranks
    load_weight: float
    symmetric: bool  # a and b interchangeable: the heaviest free expert may be fixed to a


def _free_slots(row_S: np.ndarray, rank_S: np.ndarray, a: int, b: int, keep_S: np.ndarray | None) -> np.ndarray:
    """The slots of ranks a and b whose single-replica expert may move (a's first), [F]."""
    cnt_E = np.bincount(row_S, minlength=int(row_S.max()) + 1)
    free_S = ((rank_S == a) | (rank_S == b)) & (cnt_E[row_S] == 1)
    if keep_S is not None:
        free_S &= ~keep_S
    return np.concatenate([np.flatnonzero(free_S & (rank_S == a)), np.flatnonzero(free_S & (rank_S == b))])


def _token_groups(
    ids_TK: np.ndarray, row_S: np.ndarray, rank_S: np.ndarray, slots: np.ndarray, a: int, b: int, o_T: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """The tokens grouped by (free experts needed, fixed need of a, of b, origin): the distinct
    keys [G, F + 3] and their token counts [G]; the slot serving each pair [T, K] (-1: none), its
    local free index [T, K] (-1: a fixed slot or none), and whether any token needs a or b
    through a fixed slot."""
    F = len(slots)
    local_S = np.full(len(row_S), -1)
    local_S[slots] = np.arange(F)
    vid = virtual_ids(ids_TK, row_S)
    ok = vid >= 0
    v = np.where(ok, vid, 0)
    loc = np.where(ok, local_S[v], -1)  # [T, K] local free index or -1
    fixed = ok & (loc < 0)
    fa = (fixed & (rank_S[v] == a)).any(axis=1)
    fb = (fixed & (rank_S[v] == b)).any(axis=1)
    A = np.zeros((ids_TK.shape[0], F), dtype=bool)
    t_idx, k_idx = np.nonzero(loc >= 0)
    A[t_idx, loc[t_idx, k_idx]] = True
    keys = np.concatenate([A, fa[:, None], fb[:, None], o_T[:, None]], axis=1).astype(np.int64)
    keys = keys[A.any(axis=1)]
    uniq, counts = np.unique(keys, axis=0, return_counts=True)
    return uniq, counts, vid, loc, bool(fa.any() or fb.any())


def _need_terms(
    uniq: np.ndarray, counts: np.ndarray, lin: np.ndarray, w_OR: np.ndarray, a: int, b: int, T: int
) -> tuple[list, list, list, list]:
    """The groups' costs of needing a and b: a group of one free expert adds to ``lin`` (in
    place), a larger one is a set whose need is a variable. Returns sets_a, wt_a, sets_b, wt_b."""
    F = len(lin)
    sets_a: list = []
    wt_a: list = []
    sets_b: list = []
    wt_b: list = []
    for key, c in zip(uniq, counts):
        g = np.flatnonzero(key[:F])
        ga, gb = bool(key[F]), bool(key[F + 1])
        wa, wb = float(w_OR[key[F + 2], a]), float(w_OR[key[F + 2], b])
        if not ga:
            if len(g) == 1:
                lin[g[0]] += wa * c / T
            else:
                sets_a.append(g)
                wt_a.append(wa * c / T)
        if not gb:
            if len(g) == 1:
                lin[g[0]] -= wb * c / T  # need_b = 1 - x (its constant dropped)
            else:
                sets_b.append(g)
                wt_b.append(wb * c / T)
    return sets_a, wt_a, sets_b, wt_b


def pair_model(
    ids_TK: np.ndarray,
    row_S: np.ndarray,
    rank_S: np.ndarray,
    a: int,
    b: int,
    w_R: np.ndarray,
    fetch_ER: np.ndarray,
    load_weight: float,
    keep_S: np.ndarray | None = None,
    origin_T: np.ndarray | None = None,
) -> PairModel | None:
    """The exact sub-model of ranks a, b for the layer row ``row_S`` (None: nothing to move).
    ``keep_S`` (bool [S]): slots held fixed besides the replicated experts' (a smaller
    neighbourhood the MIP can prove optimal). ``w_R``: [R], or [O, R] with ``origin_T`` [T] the
    origin class (home rank) of each token."""
    T = max(int((ids_TK >= 0).any(axis=1).sum()), 1)  # the layer's tokens (cost.layer_tokens)
    w_OR = np.atleast_2d(np.asarray(w_R, dtype=np.float64))
    o_T = np.zeros(ids_TK.shape[0], dtype=np.int64) if origin_T is None else np.asarray(origin_T)
    slots = _free_slots(row_S, rank_S, a, b, keep_S)
    F = len(slots)
    slots_a = int((rank_S[slots] == a).sum())
    if slots_a == 0 or slots_a == F:
        return None
    uniq, counts, vid, loc, fixed_need = _token_groups(ids_TK, row_S, rank_S, slots, a, b, o_T)
    experts = row_S[slots]
    lin = (fetch_ER[experts, a] - fetch_ER[experts, b]).astype(np.float64) * 1.0
    sets_a, wt_a, sets_b, wt_b = _need_terms(uniq, counts, lin, w_OR, a, b, T)
    load_R = np.bincount(rank_S[vid[vid >= 0]], minlength=w_OR.shape[1]).astype(np.float64) / T
    load = np.bincount(loc[loc >= 0], minlength=F).astype(np.float64) / T
    fixed_a = float(load_R[a] - load[:slots_a].sum())
    fixed_b = float(load_R[b] - load[slots_a:].sum())
    others = np.delete(load_R, [a, b])
    symmetric = (
        w_OR.shape[0] == 1
        and np.isclose(w_OR[0, a], w_OR[0, b])
        and np.isclose(fixed_a, fixed_b)
        and not fixed_need
        and 2 * slots_a == F
        and not fetch_ER[:, [a, b]].any()
    )
    return PairModel(
        slots,
        experts,
        slots_a,
        lin,
        sets_a,
        np.array(wt_a),
        sets_b,
        np.array(wt_b),
        load,
        fixed_a,
        fixed_b,
        float(others.max()) if len(others) else 0.0,
        load_weight,
        bool(symmetric),
    )


def pair_objective(pm: PairModel, x: np.ndarray) -> float:
    """The sub-model's objective of a 0/1 split (constants dropped)."""
    na = sum(w * x[g].max() for g, w in zip(pm.sets_a, pm.wt_a))
    nb = sum(w * (1 - x[g]).max() for g, w in zip(pm.sets_b, pm.wt_b))
    la = pm.fixed_a + pm.load @ x
    lb = pm.fixed_b + pm.load @ (1 - x)
    return float(pm.lin @ x + na + nb + pm.load_weight * max(la, lb, pm.m_floor))


def solve_pair_model(pm: PairModel, x0: np.ndarray, time_limit_s: float, solver: str) -> tuple[np.ndarray, str]:
    """Best split found within the limit, warm-started from ``x0`` (returned if nothing better)."""
    F = len(pm.lin)
    prob = pulp.LpProblem("pair", pulp.LpMinimize)
    x = [prob.add_variable(f"x_{i}", 0, 1, cat="Integer") for i in range(F)]
    na = [prob.add_variable(f"na_{g}", 0, 1) for g in range(len(pm.sets_a))]
    nb = [prob.add_variable(f"nb_{g}", 0, 1) for g in range(len(pm.sets_b))]
    m = prob.add_variable("m", pm.m_floor)
    obj = [(x[i], float(pm.lin[i])) for i in range(F) if pm.lin[i] != 0.0]
    obj += [(na[g], float(w)) for g, w in enumerate(pm.wt_a)] + [(nb[g], float(w)) for g, w in enumerate(pm.wt_b)]
    prob += pulp.LpAffineExpression(obj + [(m, float(pm.load_weight))])
    prob += pulp.LpAffineExpression([(v, 1.0) for v in x]) == pm.slots_a
    for g, s in enumerate(pm.sets_a):
        for i in s:
            prob += na[g] - x[i] >= 0
    for g, s in enumerate(pm.sets_b):
        for i in s:
            prob += nb[g] + x[i] >= 1
    prob += pulp.LpAffineExpression([(x[i], float(pm.load[i])) for i in range(F)]) - m <= -pm.fixed_a
    prob += pulp.LpAffineExpression([(x[i], -float(pm.load[i])) for i in range(F)]) - m <= -(pm.fixed_b + pm.load.sum())
    if pm.symmetric:  # the split and its mirror cost the same: put the heaviest expert on a
        h = int(np.argmax(pm.load))
        x[h].lowBound = 1
        if x0[h] < 0.5:
            x0 = 1 - x0
    for i in range(F):
        x[i].setInitialValue(float(x0[i]))
    for g, s in enumerate(pm.sets_a):
        na[g].setInitialValue(float(x0[s].max()))
    for g, s in enumerate(pm.sets_b):
        nb[g].setInitialValue(float((1 - x0[s]).max()))
    m.setInitialValue(max(pm.fixed_a + pm.load @ x0, pm.fixed_b + pm.load @ (1 - x0), pm.m_floor))
    tl = max(time_limit_s, 0.05)
    if solver == "highs" and HAVE_HIGHS:
        prob.solve(_HiGHSWarm(True, msg=False, timeLimit=tl, gapRel=1e-6, threads=1))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=tl, gapRel=1e-6, warmStart=True, threads=1))
    if prob.sol_status not in (1, 2):
        return x0, "no solution"
    xs = np.array([1.0 if (v.varValue or 0.0) > 0.5 else 0.0 for v in x])
    if int(xs.sum()) != pm.slots_a:
        return x0, "no solution"
    return xs, "optimal" if prob.sol_status == 1 else "feasible"


def apply_split(row_S: np.ndarray, pm: PairModel, x: np.ndarray) -> np.ndarray:
    """The row with the free experts of a and b re-split by ``x`` (1 = rank a)."""
    new = row_S.copy()
    new[pm.slots[: pm.slots_a]] = pm.experts[x > 0.5]
    new[pm.slots[pm.slots_a :]] = pm.experts[x < 0.5]
    return new


def lns_layer(
    ids_TK: np.ndarray,
    row_S: np.ndarray,
    rank_S: np.ndarray,
    w_R: np.ndarray,
    fetch_ER: np.ndarray,
    load_weight: float,
    objective,
    deadline: float,
    solver: str,
    max_free: int = 8,
    sub_time_s: float = 1.0,
    seed: int = 0,
    max_sweeps: int = 1_000_000,
    tol: float = 1e-12,
    origin_T: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Sweep over rank pairs; for each, free at most ``max_free`` single-replica experts per rank
    (a seeded random choice when a rank holds more; all of them otherwise) and re-split them
    with the exact sub-MIP (``sub_time_s`` each, warm-started from the current split). Stops at
    ``deadline``, after ``max_sweeps`` sweeps over all pairs, or after a full sweep without
    improvement when no neighbourhood was subsampled. ``objective(row) -> float`` is the exact layer
    objective that accepts a move.
    ``w_R`` / ``origin_T``: as in :func:`pair_model`.
    Returns the row and counters (subproblems solved, proven optimal, improvements)."""
    R = int(rank_S.max()) + 1
    rng = np.random.default_rng(seed)
    best, best_obj = row_S.copy(), objective(row_S)
    info = {"subproblems": 0, "proven": 0, "improvements": 0}
    pairs = list(itertools.combinations(range(R), 2))
    stale, complete = 0, True  # complete: no neighbourhood of this sweep was subsampled
    for _ in range(max_sweeps if pairs else 0):
        for a, b in pairs:
            left = deadline - time.monotonic()
            if left < 0.05:
                return best, info
            keep, sampled = _neighbourhood(len(best), rank_S, a, b, max_free, rng)
            complete = complete and not sampled
            pm = pair_model(ids_TK, best, rank_S, a, b, w_R, fetch_ER, load_weight, keep, origin_T)
            stale += 1
            cand = None if pm is None else _resplit(pm, best, min(sub_time_s, left), solver, info, tol)
            if cand is not None:
                obj = objective(cand)
                if obj < best_obj - tol:
                    best, best_obj = cand, obj
                    info["improvements"] += 1
                    stale = 0
            if stale >= len(pairs) and complete:
                return best, info
            if stale >= len(pairs):
                stale, complete = 0, True
    return best, info


def _neighbourhood(
    num_slots: int, rank_S: np.ndarray, a: int, b: int, max_free: int, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """Slots held fixed (bool [S]): all but at most ``max_free`` of a's and of b's (a seeded
    choice where a rank holds more), and whether either was subsampled."""
    keep = np.ones(num_slots, dtype=bool)
    sampled = False
    for r in (a, b):
        on_r = np.flatnonzero(rank_S == r)
        if len(on_r) > max_free:
            sampled = True
            on_r = rng.choice(on_r, max_free, replace=False)
        keep[on_r] = False
    return keep, sampled


def _resplit(pm: PairModel, row_S: np.ndarray, time_s: float, solver: str, info: dict, tol: float) -> np.ndarray | None:
    """The row with a and b re-split by the sub-MIP when it lowers the sub-model's objective
    (None otherwise); counts the subproblem in ``info``."""
    x0 = np.zeros(len(pm.slots))
    x0[: pm.slots_a] = 1.0
    xs, status = solve_pair_model(pm, x0, time_s, solver)
    info["subproblems"] += 1
    info["proven"] += status == "optimal"
    if pair_objective(pm, xs) < pair_objective(pm, x0) - tol:
        return apply_split(row_S, pm, xs)
    return None
