"""The exact ILP of one layer: the hypergraph connectivity model (HiGHS; CBC through PuLP).

Owns: building the exact model of a :class:`~placement.hypergraph.LayerHypergraph` as sparse
arrays, solving it with HiGHS (highspy) or, without highspy, with PuLP's bundled CBC, the warm
start, and the proven bound on the true layer objective.

Legend: V vertices (expert replicas), R ranks, H hyperedges kept in the model.

Model (per token; every coefficient is the one ``evaluate()`` uses, see hypergraph.py):

    x[v, r] in {0, 1}    vertex v on rank r;   sum_r x[v, r] = 1,   sum_v x[v, r] = slots[r]
    z[h, r] in [0, 1]    hyperedge h touches r:  z[h, r] >= x[v, r] for every pin v of h
    m >= 0               busiest rank:  m >= sum_v load[v] x[v, r] / T   (optional cap on it)
    replicas of one expert on strictly increasing ranks:
                         sum_r r x[v_{j+1}, r] - sum_r r x[v_j, r] >= 1
    optional fault domains (domains.py), for each expert e to keep on two domains and domain d:
                         sum_{v of e} sum_{r in d} x[v, r] <= cnt[e] - 1
    minimise  sum_{h,r} weight[h] w[o(h), r] z[h, r] / T + sum_{v,r} (single[v, o] w[o, r] / T + fetch[v, r]) x[v, r]
              + load_weight * m

``w[o, r]``: cost of a token of origin class o reaching rank r. Without home ranks there is one
class, ``send_weight_R``; with home ranks o is the token's home and ``w = link_cost_RR``
(hypergraph.py: a fixed home vertex per hyperedge, folded into its cost row; ``w[o, o] = 0``).

z needs no integrality: with w >= 0 the optimum puts z[h, r] = max_v x[v, r]. For the
hyperedges kept, the model's value *is* ``evaluate()``'s layer objective: traffic with dedup
(with uniform w, ``w * (km1 + sum_h weight[h]) / T``, Mt-KaHyPar's km1), busiest-rank load and
migration. There is no objective constant (PITFALLS: HiGHS drops constants and misreports gaps).

Hyperedge cap: real traces have one distinct top-k set per token or so, and the root LP of
this model is slow (Qwen, 1,480 hyperedges x 4 ranks: over 10 s). ``max_edges`` keeps the
heaviest hyperedges; each one left out costs its weight x min(w) (connectivity >= 1) in the
model, which makes the model a *relaxation* of the true objective: its proven bound stays a
lower bound of the true layer objective, while the answer is always re-scored exactly.

Replica counts are fixed by the caller (phases.py: :func:`placement.baselines.replica_counts`),
so with replicas the bound holds for placements with those counts. Symmetry breaking when ranks
are interchangeable (one origin class, equal w and slots, no migration term, no replicas; home
ranks pin tokens to ranks, so they are never interchangeable then): the i-th heaviest
vertex may only use ranks 0..i; the warm start is relabelled to satisfy it.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp

from placement.hypergraph import LayerHypergraph
from placement.ilp import HAVE_HIGHS, _cbc_bound

if HAVE_HIGHS:
    import highspy

INF = float("inf")


@dataclass(frozen=True)
class ExactModel:
    """The sparse arrays of one layer's exact model (columns: x [V*R], z [H*R], then m)."""

    cost: np.ndarray
    col_ub: np.ndarray
    num_int: int  # the first num_int columns are binary (x)
    row_ptr: np.ndarray
    row_idx: np.ndarray
    row_val: np.ndarray
    row_lo: np.ndarray
    row_hi: np.ndarray
    num_vertices: int
    num_ranks: int
    num_edges: int  # kept in the model
    left_out_cost: float  # weight x min(w) / T of the hyperedges left out (a lower bound)
    symmetric: bool


@dataclass(frozen=True)
class ExactResult:
    rank_V: np.ndarray | None  # the solver's answer (None: none)
    bound: float  # proven lower bound on the true layer objective (nan: none)
    status: str  # "optimal" | "feasible" | "warm start only" | "no solution"
    nodes: int


def _rows(parts: list) -> tuple:
    """CSR arrays from (cols [n, width], vals [n, width], lo [n], hi [n]) blocks."""
    ptr, idx, val, lo, hi = [np.zeros(1, dtype=np.int64)], [], [], [], []
    off = 0
    for cols, vals, rlo, rhi in parts:
        n, width = cols.shape
        ptr.append(off + width * np.arange(1, n + 1))
        off += n * width
        idx.append(cols.ravel())
        val.append(vals.ravel())
        lo.append(rlo)
        hi.append(rhi)
    return (
        np.concatenate(ptr),
        np.concatenate(idx).astype(np.int32),
        np.concatenate(val).astype(np.float64),
        np.concatenate(lo).astype(np.float64),
        np.concatenate(hi).astype(np.float64),
    )


def build_exact(
    hg: LayerHypergraph,
    w_R: np.ndarray,
    slots_R: np.ndarray,
    load_weight: float,
    fetch_VR: np.ndarray,
    max_edges: int,
    cap: float | None = None,
    span: tuple[np.ndarray, np.ndarray] | None = None,
) -> ExactModel:
    """The model in the module docstring, on the ``max_edges`` heaviest hyperedges; ``span``:
    ``(domain_R [R], cover_E bool [E])``, the experts to keep on two fault domains."""
    V, R, T = hg.num_vertices, np.shape(w_R)[-1], max(hg.num_tokens, 1)
    H = min(hg.num_edges, max(int(max_edges), 0))
    P = int(hg.edge_ptr[H])
    nx, nz = V * R, H * R
    edge_HR = hg.edge_cost_HR(w_R)
    cost_x = hg.single_cost_VR(w_R) / T + fetch_VR
    cost_z = edge_HR[:H] / T
    cost = np.concatenate([cost_x.ravel(), cost_z.ravel(), [float(load_weight)]])
    col_ub = np.concatenate([np.ones(nx + nz), [INF]])
    vr = np.arange(V)[:, None] * R + np.arange(R)[None, :]  # column of x[v, r]
    parts = [
        (vr, np.ones((V, R)), np.ones(V), np.ones(V)),
        (vr.T, np.ones((R, V)), slots_R.astype(float), slots_R.astype(float)),
    ]
    mcol = np.full((R, 1), nx + nz)
    load_vals = np.concatenate([np.tile(hg.load_V / T, (R, 1)), -np.ones((R, 1))], axis=1)
    parts.append((np.concatenate([vr.T, mcol], axis=1), load_vals, np.full(R, -INF), np.zeros(R)))
    if cap is not None:
        parts.append((vr.T, np.tile(hg.load_V / T, (R, 1)), np.full(R, -INF), np.full(R, float(cap))))
    parts += _replica_order_rows(hg, vr)
    if span is not None:
        parts += _span_rows(hg, vr, *span)
    parts += _pin_rows(hg, vr, nx, P)
    ptr, idx, val, lo, hi = _rows(parts)
    w_OR = np.atleast_2d(w_R)
    symmetric = (
        w_OR.shape[0] == 1
        and bool(np.allclose(w_OR, w_OR[0, 0]))
        and bool((slots_R == slots_R[0]).all())
        and not fetch_VR.any()
        and not hg.replicated
    )
    if symmetric:
        order = np.argsort(-hg.load_V, kind="stable")
        for i, v in enumerate(order[: R - 1]):
            col_ub[vr[v, i + 1 :]] = 0.0
    left_out = float(edge_HR[H:].min(axis=1, initial=INF).sum()) / T if H < hg.num_edges else 0.0
    return ExactModel(cost, col_ub, nx, ptr, idx, val, lo, hi, V, R, H, left_out, symmetric)


def _replica_order_rows(hg: LayerHypergraph, vr: np.ndarray) -> list:
    """Replicas of one expert on strictly increasing ranks: rank(v) - rank(v - 1) >= 1."""
    R = vr.shape[1]
    nxt = np.flatnonzero(hg.replica_V[1:] > 0) + 1  # v with a predecessor replica v - 1
    if not nxt.size:
        return []
    cols = np.concatenate([vr[nxt], vr[nxt - 1]], axis=1)
    vals = np.concatenate(
        [np.tile(np.arange(R, dtype=float), (nxt.size, 1)), -np.tile(np.arange(R, dtype=float), (nxt.size, 1))],
        axis=1,
    )
    return [(cols, vals, np.ones(nxt.size), np.full(nxt.size, INF))]


def _pin_rows(hg: LayerHypergraph, vr: np.ndarray, nx: int, P: int) -> list:
    """z[h, r] >= x[v, r] for each of the first P pins (v of hyperedge h) and rank r."""
    if not P:
        return []
    R = vr.shape[1]
    e_P = hg.edge_of_pin()[:P]
    zc = nx + e_P[:, None] * R + np.arange(R)[None, :]  # [P, R]
    cols = np.stack([zc.ravel(), vr[hg.edge_pins[:P]].ravel()], axis=1)
    vals = np.tile([1.0, -1.0], (P * R, 1))
    return [(cols, vals, np.zeros(P * R), np.full(P * R, INF))]


def _span_rows(hg: LayerHypergraph, vr: np.ndarray, domain_R: np.ndarray, cover_E: np.ndarray) -> list:
    """One row per covered expert e and domain d: at most cnt[e] - 1 of e's vertices on d."""
    out = []
    for e in np.flatnonzero(cover_E):
        v_e = np.flatnonzero(hg.expert_V == e)
        for d in np.unique(domain_R):
            cols = vr[np.ix_(v_e, np.flatnonzero(domain_R == d))].reshape(1, -1)
            out.append((cols, np.ones(cols.shape), np.full(1, -INF), np.full(1, float(len(v_e) - 1))))
    return out


def canonical_ranks(m: ExactModel, load_V: np.ndarray, rank_V: np.ndarray) -> np.ndarray:
    """Relabel interchangeable ranks so that ``rank_V`` obeys the symmetry rule (ranks numbered
    in the order the heaviest-first vertices first use them)."""
    if not m.symmetric:
        return rank_V
    seen: list[int] = []
    for v in np.argsort(-load_V, kind="stable"):
        if int(rank_V[v]) not in seen:
            seen.append(int(rank_V[v]))
    seen += [r for r in range(m.num_ranks) if r not in seen]
    relabel = np.empty(m.num_ranks, dtype=np.int64)
    relabel[seen] = np.arange(m.num_ranks)
    return relabel[rank_V]


def warm_values(m: ExactModel, hg: LayerHypergraph, rank_V: np.ndarray) -> np.ndarray:
    """Column values of the assignment ``rank_V`` (already canonical)."""
    V, R, H = m.num_vertices, m.num_ranks, m.num_edges
    x = np.zeros((V, R))
    x[np.arange(V), rank_V] = 1.0
    z = np.zeros((H, R))
    P = int(hg.edge_ptr[H])
    z[hg.edge_of_pin()[:P], rank_V[hg.edge_pins[:P]]] = 1.0
    mk = float((hg.load_V @ x).max()) / max(hg.num_tokens, 1)
    return np.concatenate([x.ravel(), z.ravel(), [mk]])


def _solve_highs(
    m: ExactModel, warm: np.ndarray | None, time_limit_s: float, mip_gap: float, seed: int, max_nodes: int
) -> tuple[np.ndarray | None, float, str, int]:
    h = highspy.Highs()
    for key, value in (
        ("output_flag", False),
        ("threads", 1),
        ("random_seed", int(seed)),
        ("time_limit", float(time_limit_s)),
        ("mip_rel_gap", float(mip_gap)),
        ("mip_max_nodes", int(max_nodes)),
    ):
        h.setOptionValue(key, value)
    n = m.cost.shape[0]
    h.addCols(
        n, m.cost, np.zeros(n), m.col_ub, 0, np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0)
    )
    h.changeColsIntegrality(
        m.num_int, np.arange(m.num_int, dtype=np.int32), np.full(m.num_int, highspy.HighsVarType.kInteger)
    )
    h.addRows(
        m.row_lo.shape[0], m.row_lo, m.row_hi, m.row_idx.shape[0], m.row_ptr[:-1].astype(np.int32), m.row_idx, m.row_val
    )
    end = time.monotonic() + float(time_limit_s)

    def _stop(event) -> None:  # HiGHS checks its time limit too rarely; this does not reach
        # inside a root cut round either (OLMoE, 400 hyperedges x 4 ranks: 1.9 s asked, 5.6 s taken)
        if time.monotonic() > end:
            event.interrupt()

    h.cbMipInterrupt.subscribe(_stop)
    h.cbSimplexInterrupt.subscribe(_stop)
    if warm is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(warm)
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    info = h.getInfo()
    st = h.getModelStatus()
    has = info.primal_solution_status == 2  # kSolutionStatusFeasible
    vals = np.asarray(h.getSolution().col_value) if has else None
    status = "optimal" if st == highspy.HighsModelStatus.kOptimal else ("feasible" if has else "no solution")
    return vals, float(info.mip_dual_bound), status, int(info.mip_node_count)


def _solve_cbc(
    m: ExactModel, warm: np.ndarray | None, time_limit_s: float, mip_gap: float
) -> tuple[np.ndarray | None, float, str, int]:
    n = m.cost.shape[0]
    prob = pulp.LpProblem("exact_layer", pulp.LpMinimize)
    cols = [
        prob.add_variable(
            f"c{j}",
            0,
            None if math.isinf(m.col_ub[j]) else float(m.col_ub[j]),
            cat="Integer" if j < m.num_int else "Continuous",
        )
        for j in range(n)
    ]
    prob += pulp.LpAffineExpression([(cols[j], float(m.cost[j])) for j in np.flatnonzero(m.cost)])
    for i in range(m.row_lo.shape[0]):
        a, b = m.row_ptr[i], m.row_ptr[i + 1]
        expr = pulp.LpAffineExpression([(cols[j], float(v)) for j, v in zip(m.row_idx[a:b], m.row_val[a:b])])
        lo, hi = m.row_lo[i], m.row_hi[i]
        if lo == hi:
            prob += expr == float(lo)
        else:
            if not math.isinf(lo):
                prob += expr >= float(lo)
            if not math.isinf(hi):
                prob += expr <= float(hi)
    if warm is not None:
        for c, v in zip(cols, warm):
            c.setInitialValue(float(v))
    with tempfile.TemporaryDirectory() as td:
        log = Path(td) / "cbc.log"
        with warnings.catch_warnings():  # PuLP 3.3 flags its bundled CBC as deprecated for 4.0
            warnings.simplefilter("ignore", DeprecationWarning)
            prob.solve(
                pulp.PULP_CBC_CMD(
                    msg=False,
                    timeLimit=max(time_limit_s, 0.05),
                    gapRel=mip_gap,
                    warmStart=warm is not None,
                    logPath=str(log),
                    threads=1,
                )
            )
        bound = _cbc_bound(log.read_text() if log.exists() else "")
    sol = prob.sol_status
    if sol not in (1, 2):
        return None, math.nan, "no solution", 0
    vals = np.array([c.varValue or 0.0 for c in cols])
    b = math.nan if bound is None else float(bound)
    if sol == 1:  # CBC logs only intermediate bounds; "optimal" means closed to mip_gap
        obj = float(m.cost @ vals)
        b = max(b, obj - mip_gap * abs(obj)) if math.isfinite(b) else obj - mip_gap * abs(obj)
    return vals, b, "optimal" if sol == 1 else "feasible", 0


def trivial_bound(hg: LayerHypergraph, w_R: np.ndarray, load_weight: float) -> float:
    """A closed-form lower bound of the layer objective: every token reaches at least one rank
    (connectivity >= 1: at least its origin's cheapest rank, 0 with home ranks), and the busiest
    rank carries at least the mean load and at least the heaviest vertex."""
    T = max(hg.num_tokens, 1)
    R = np.shape(w_R)[-1]
    tokens = float(hg.edge_cost_HR(w_R).min(axis=1, initial=INF).sum() if hg.num_edges else 0.0)
    tokens += float(hg.single_cost_VR(w_R).min(axis=1, initial=INF).sum() if hg.num_vertices else 0.0)
    busiest = max(float(hg.load_V.sum()) / R, float(hg.load_V.max(initial=0.0)))
    return (tokens + load_weight * busiest) / T


def solve_exact(
    hg: LayerHypergraph,
    w_R: np.ndarray,
    slots_R: np.ndarray,
    load_weight: float,
    fetch_VR: np.ndarray,
    *,
    warm_V: np.ndarray | None,
    time_limit_s: float,
    max_edges: int,
    mip_gap: float = 1e-4,
    solver: str = "highs",
    seed: int = 0,
    max_nodes: int = 10_000,
    cap: float | None = None,
    span: tuple[np.ndarray, np.ndarray] | None = None,
) -> ExactResult:
    """Solve one layer's exact model (module docstring) from the warm start ``warm_V`` (a rank
    per vertex); ``w_R``: [R], or [O, R] for a hypergraph with origin classes. ``bound`` is a
    proven lower bound of the true layer objective: the larger of
    the solver's dual bound (plus the left-out hyperedges' floor) and :func:`trivial_bound`
    (with ``span``, of the placements that keep those experts on two fault domains)."""
    if solver not in ("highs", "cbc"):
        raise ValueError(f"solver ({solver!r}) must be 'highs' or 'cbc'")
    if solver == "highs" and not HAVE_HIGHS:
        raise ValueError("solver 'highs' requested but highspy is not importable")
    w_R = np.asarray(w_R, dtype=float)
    m = build_exact(hg, w_R, np.asarray(slots_R), load_weight, fetch_VR, max_edges, cap, span)
    warm = None
    if warm_V is not None:
        warm = warm_values(m, hg, canonical_ranks(m, hg.load_V, np.asarray(warm_V)))
    if solver == "highs":
        vals, dual, status, nodes = _solve_highs(m, warm, time_limit_s, mip_gap, seed, max_nodes)
    else:
        vals, dual, status, nodes = _solve_cbc(m, warm, time_limit_s, mip_gap)
    bound = trivial_bound(hg, w_R, load_weight)
    if math.isfinite(dual):
        bound = max(bound, dual + m.left_out_cost)
    if vals is None:
        return ExactResult(None, bound, "warm start only" if warm is not None else "no solution", nodes)
    rank_V = np.argmax(vals[: m.num_int].reshape(m.num_vertices, m.num_ranks), axis=1).astype(np.int64)
    # a proven bound never exceeds the incumbent's value (CBC logs its bound rounded)
    bound = min(bound, float(m.cost @ warm_values(m, hg, rank_V)) + m.left_out_cost)
    return ExactResult(rank_V, bound, status, nodes)
