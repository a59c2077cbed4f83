"""FM refinement of one layer on the exact hypergraph objective, and iterated FM.

Owns: :func:`fm_refine` (Fiduccia-Mattheyses passes of single-vertex moves with a balance slack)
and :func:`iterated_fm` (seeded perturbation + FM, count-bounded) that the ILP pipeline
(``phases.py``) runs after the tabu search.

Legend: V vertices (expert replicas), H hyperedges, R ranks.

Why: the tabu search (baselines.py) walks exchanges of two slots, so every state it visits is
balanced (each rank holds exactly its slots). FM moves *one* vertex at a time with a balance
slack of one vertex (the balance tolerance of partitioners' FM, at its tightest):
from a balanced state any move is allowed (its source rank is then one below its slots, its
target one above); while a rank is one above, the next move must take a vertex *out of it*. So
a pass is a sequence of ejection chains a -> b -> c -> ... -> a (a swap is the chain of two),
each link chosen by its gain after the previous ones, which reaches what two-slot exchanges
do not (a 3-cycle, a move whose partner only pays after it). Only balanced states are kept: a
pass returns to its best balanced prefix. (A looser slack, any rank within one of its slots,
lets a pass drift into states it cannot leave cheaply: on the Qwen trace it did not even find
an improving swap.)

Objective: exactly :meth:`LayerHypergraph.objective` (traffic with dedup over *all* hyperedges,
``load_weight`` x busiest rank, migration ``fetch_VR``), which is ``evaluate()``'s layer
objective for a rank per vertex whose replicas of one expert sit on strictly increasing ranks
(hypergraph.py). Every move keeps that order, so every state is a valid layer row.

Move gain (per token), vertex v from rank a to rank r, with pin counts phi[h, r]:

    delta = (sum_{h ∋ v, phi[h, r] = 0} weight[h] w[r] - sum_{h ∋ v, phi[h, a] = 1} weight[h] w[a]
             + single[v] (w[r] - w[a])) / T
            + load_weight (max load after - max load before) / T + fetch[v, r] - fetch[v, a]

Fault domains (domains.py): with ``domains`` no move leaves an expert that is multi-homed
single-homed (every state keeps the start's multi-homed experts).

Deterministic: FM takes the first best move (no randomness); iterated FM draws its
perturbations from the caller's seeded generator, and the clock only caps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from placement.domains import FaultDomains
from placement.hypergraph import LayerHypergraph

FM_PATIENCE = 24  # moves without a new best balanced state before a pass stops
FM_MAX_PASSES = 20  # passes per refinement (each one must improve to continue)
TOL = 1e-12


class _Incidence:
    """The static part of one hypergraph that FM reads on every move: built once per
    refinement (iterated FM shares it across its rounds)."""

    def __init__(self, hg: LayerHypergraph):
        V = hg.num_vertices
        self.B_VH = np.zeros((V, hg.num_edges))
        self.B_VH[hg.edge_pins, hg.edge_of_pin()] = 1.0
        self.edges_V = [np.flatnonzero(b) for b in self.B_VH]
        # per vertex: its hyperedges' weights and their incidence rows [deg, V] (move())
        self.wt_V = [hg.weight_H[e] for e in self.edges_V]
        self.sub_V = [np.ascontiguousarray(self.B_VH[:, e].T) for e in self.edges_V]
        # replicas of one expert: the previous / next replica's vertex (-1: none)
        rep = hg.replica_V
        self.prev_V = np.where(rep > 0, np.arange(V) - 1, -1)
        nxt = np.append(rep[1:] > 0, False)
        self.next_V = np.where(nxt, np.arange(V) + 1, -1)


class _Moves:
    """Pin counts and loads of one assignment; the delta of every move; applying moves."""

    def __init__(
        self,
        hg: LayerHypergraph,
        rank_V: np.ndarray,
        w_R: np.ndarray,
        load_weight: float,
        fetch_VR: np.ndarray,
        inc: _Incidence | None = None,
        domains: FaultDomains | None = None,
    ):
        V, R = hg.num_vertices, w_R.shape[0]
        self.expert_V, self.domains = hg.expert_V, domains
        self.V, self.R, self.T = V, R, float(max(hg.num_tokens, 1))
        self.w_R, self.lw, self.fetch_VR = w_R, float(load_weight), fetch_VR
        self.single_V, self.load_V, self.weight_H = hg.single_V, hg.load_V, hg.weight_H
        inc = _Incidence(hg) if inc is None else inc
        self.edges_V, self.wt_V, self.sub_V = inc.edges_V, inc.wt_V, inc.sub_V
        self.prev_V, self.next_V = inc.prev_V, inc.next_V
        self.rank_V = np.asarray(rank_V, dtype=np.int64).copy()
        # pin counts, rank-major so that move() updates two contiguous rows
        self.phi_RH = np.ascontiguousarray((inc.B_VH.T @ np.eye(R)[self.rank_V]).T)
        # weight of v's hyperedges that miss rank r (add_VR) / have one pin on r (one_VR):
        # integer token counts, so the incremental updates in move() stay exact
        wt = self.weight_H[:, None]
        self.add_VR = inc.B_VH @ (wt * (self.phi_RH.T == 0))
        self.one_VR = inc.B_VH @ (wt * (self.phi_RH.T == 1))
        self.load_R = np.bincount(self.rank_V, weights=self.load_V, minlength=R)
        self.count_R = np.bincount(self.rank_V, minlength=R)

    def delta_VR(self, rows: np.ndarray | None = None) -> np.ndarray:
        """[n, R] objective change of moving vertex ``rows[i]`` (default: all) to rank r (+inf
        for its own rank)."""
        idx = np.arange(self.V) if rows is None else rows
        a = self.rank_V[idx]
        add = self.add_VR[idx] * self.w_R[None, :]
        rem = self.one_VR[idx, a] * self.w_R[a]
        d_tr = add - rem[:, None] + self.single_V[idx, None] * (self.w_R[None, :] - self.w_R[a][:, None])
        fetch = self.fetch_VR[idx]
        d = d_tr / self.T + fetch - fetch[np.arange(len(idx)), a][:, None]
        if self.lw:
            d += self.lw * (self._max_after(idx) - self.load_R.max()) / self.T
        d[np.arange(len(idx)), a] = np.inf
        return d

    def _max_after(self, idx: np.ndarray) -> np.ndarray:
        """[n, R] busiest rank load after moving vertex idx[i] to r."""
        a, R = self.rank_V[idx], self.R
        top = np.argsort(-self.load_R, kind="stable")[:3]
        rest_RR = np.array(
            [[next((self.load_R[k] for k in top if k != i and k != j), 0.0) for j in range(R)] for i in range(R)]
        )
        to_VR = self.load_R[None, :] + self.load_V[idx, None]
        from_V = self.load_R[a] - self.load_V[idx]
        return np.maximum(np.maximum(to_VR, from_V[:, None]), rest_RR[a])

    def legal_VR(self, slots_R: np.ndarray, locked_V: np.ndarray) -> np.ndarray:
        """[V, R] legal moves: unlocked, replicas of one expert kept on increasing ranks, and
        while some rank holds one vertex above its slots, only moves out of that rank (with fault
        domains: none that leaves a multi-homed expert single-homed)."""
        ranks = np.arange(self.R)[None, :]
        lo = np.where(self.prev_V >= 0, self.rank_V[np.maximum(self.prev_V, 0)], -1)
        hi = np.where(self.next_V >= 0, self.rank_V[np.maximum(self.next_V, 0)], self.R)
        ok = (ranks > lo[:, None]) & (ranks < hi[:, None]) & ~locked_V[:, None]
        over = self.count_R - slots_R
        if over.max() > 0:
            ok &= (self.rank_V == int(np.argmax(over)))[:, None]
        if self.domains is not None:
            ok &= ~self.domains.unhoming_moves(self.expert_V, self.rank_V)
        return ok

    def move(self, v: int, r: int) -> None:
        a = int(self.rank_V[v])
        pins = self.edges_V[v]
        row_a, row_r = self.phi_RH[a], self.phi_RH[r]
        pa, pr = row_a[pins], row_r[pins]
        row_a[pins] = pa - 1
        row_r[pins] = pr + 1
        wt = self.wt_V[v]
        a1, r0 = pa == 1, pr == 0
        change = np.empty((4, len(pins)))
        change[0] = wt * a1  # hyperedges that now miss a
        change[1] = -wt * r0  # ... that now reach r
        change[2] = wt * ((pa == 2).astype(float) - a1)  # ... that keep one pin on a / had one on r
        change[3] = wt * (r0.astype(float) - (pr == 1))
        d = change @ self.sub_V[v]  # [4, V]
        self.add_VR[:, a] += d[0]
        self.add_VR[:, r] += d[1]
        self.one_VR[:, a] += d[2]
        self.one_VR[:, r] += d[3]
        self.load_R[a] -= self.load_V[v]
        self.load_R[r] += self.load_V[v]
        self.count_R[a] -= 1
        self.count_R[r] += 1
        self.rank_V[v] = r


def _fm_pass(st: _Moves, slots_R: np.ndarray, patience: int) -> float:
    """One pass from a balanced state: best legal move after move, each vertex at most once,
    then back to the best balanced prefix. Returns the objective change (<= 0)."""
    locked = np.zeros(st.V, dtype=bool)
    log: list[tuple[int, int]] = []  # (vertex, rank it left)
    cur, best, best_len = 0.0, 0.0, 0
    while len(log) - best_len < patience:
        legal = st.legal_VR(slots_R, locked)
        rows = np.flatnonzero(legal.any(axis=1))
        if not len(rows):
            break
        d = np.where(legal[rows], st.delta_VR(rows), np.inf)
        k = int(np.argmin(d))
        if not np.isfinite(d.flat[k]):
            break
        i, r = divmod(k, st.R)
        v = int(rows[i])
        log.append((v, int(st.rank_V[v])))
        st.move(v, r)
        locked[v] = True
        cur += float(d.flat[k])
        if cur < best - TOL and np.array_equal(st.count_R, slots_R):
            best, best_len = cur, len(log)
    for v, a in reversed(log[best_len:]):
        st.move(v, a)
    return best


def fm_refine(
    hg: LayerHypergraph,
    rank_V: np.ndarray,
    w_R: np.ndarray,
    slots_R: np.ndarray,
    load_weight: float,
    fetch_VR: np.ndarray | None = None,
    *,
    patience: int = FM_PATIENCE,
    max_passes: int = FM_MAX_PASSES,
    deadline: float = float("inf"),
    _inc: _Incidence | None = None,
    domains: FaultDomains | None = None,
) -> np.ndarray:
    """FM passes from the balanced assignment ``rank_V`` [V] (vertex counts per rank equal
    ``slots_R``; replicas of each expert on increasing ranks) until a pass finds nothing,
    ``max_passes`` or ``deadline``. Returns a balanced assignment whose objective
    (:meth:`LayerHypergraph.objective`) is never higher than the start's; ``domains``: see the
    module docstring."""
    w_R = np.asarray(w_R, dtype=np.float64)
    slots_R = np.asarray(slots_R, dtype=np.int64)
    if not np.array_equal(np.bincount(rank_V, minlength=len(slots_R)), slots_R):
        raise ValueError(
            f"rank_V holds {np.bincount(rank_V, minlength=len(slots_R)).tolist()} vertices "
            f"per rank, slots_R {slots_R.tolist()}"
        )
    fetch = np.zeros((hg.num_vertices, len(w_R))) if fetch_VR is None else np.asarray(fetch_VR, dtype=np.float64)
    st = _Moves(hg, rank_V, w_R, load_weight, fetch, _inc, domains)
    for _ in range(max_passes):
        if time.monotonic() > deadline or not _fm_pass(st, slots_R, patience) < -TOL:
            break
    return st.rank_V.copy()


@dataclass(frozen=True)
class IteratedFM:
    rank_V: np.ndarray  # the best assignment found
    objective: float  # its LayerHypergraph.objective
    rounds: int  # perturbation rounds run
    improvements: int  # rounds that found a better assignment
    capped: bool  # the clock stopped it before its rounds were done


def perturb_ranks(rank_V: np.ndarray, replica_V: np.ndarray, rng: np.random.Generator, swaps: int) -> np.ndarray:
    """``swaps`` random exchanges of two single-replica vertices on different ranks (counts per
    rank and replica order unchanged)."""
    out = rank_V.copy()
    free = np.flatnonzero((replica_V == 0) & (np.append(replica_V[1:], 0) == 0))
    for _ in range(swaps if len(free) >= 2 else 0):
        v, u = rng.choice(free, 2, replace=False)
        out[v], out[u] = out[u], out[v]
    return out


def iterated_fm(
    hg: LayerHypergraph,
    rank_V: np.ndarray,
    w_R: np.ndarray,
    slots_R: np.ndarray,
    load_weight: float,
    fetch_VR: np.ndarray | None,
    rng: np.random.Generator,
    *,
    rounds: int,
    swaps: int,
    deadline: float = float("inf"),
    domains: FaultDomains | None = None,
) -> IteratedFM:
    """FM from ``rank_V``, then ``rounds`` times: perturb the best by ``swaps`` random exchanges
    and FM again, keeping the better (count-bounded and seeded; ``deadline`` only caps it)."""
    w_R = np.asarray(w_R, dtype=np.float64)

    def obj(r: np.ndarray) -> float:
        return hg.objective(r, w_R, load_weight, fetch_VR)

    inc = _Incidence(hg)
    best = fm_refine(hg, rank_V, w_R, slots_R, load_weight, fetch_VR, deadline=deadline, _inc=inc, domains=domains)
    best_obj = min(obj(best), obj(rank_V))
    if obj(rank_V) <= obj(best):
        best = np.asarray(rank_V).copy()
    done = improved = 0
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        cand = fm_refine(
            hg,
            perturb_ranks(best, hg.replica_V, rng, swaps),
            w_R,
            slots_R,
            load_weight,
            fetch_VR,
            deadline=deadline,
            _inc=inc,
            domains=domains,
        )
        done += 1
        c = obj(cand)
        if c < best_obj - TOL:
            best, best_obj, improved = cand, c, improved + 1
    return IteratedFM(best, best_obj, done, improved, done < rounds)
