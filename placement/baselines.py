"""Baseline placements and the local-search improver, all on the one cost model (cost.py).

Owns: replica counts for hot experts (:func:`replica_counts`), greedy balanced packing with
hot-expert replication (EPLB-style, :func:`greedy_layer`), and pairwise-swap local search
(:func:`local_search_layer`). Contiguous and round-robin are ``Placement`` constructors. With
fault domains (domains.py) the counts first give the experts to cover a second replica, the
packing puts it on another domain, and the searches skip exchanges that leave a multi-homed
expert single-homed; without them every function is what it was.

Legend: T tokens, K top-k, E experts, R ranks, S slots.
"""

from __future__ import annotations

import time

import numpy as np

from placement.cost import holders_ER, origin_classes, virtual_ids
from placement.domains import FaultDomains
from placement.stats import RoutingStats, onehot_TE
from placement.topology import Topology


PAIR_DENSITY_MAX = 0.5  # exact swap deltas use the (token, slot, slot) pair list up to this x T x S


def replica_counts(load_E: np.ndarray, topo: Topology, cover_E: np.ndarray | None = None) -> np.ndarray:
    """Replicas per expert [E] filling every slot: one each (two for the experts of ``cover_E``,
    bool [E]: those to keep on two fault domains), then the extra slots go one at a time to the
    expert with the highest load per replica (at most one replica per rank)."""
    E = load_E.shape[0]
    topo.check_experts(E)
    cnt = np.ones(E, dtype=np.int64) + (0 if cover_E is None else np.asarray(cover_E, dtype=np.int64))
    for _ in range(topo.num_slots - int(cnt.sum())):
        per = np.where(cnt < topo.num_ranks, load_E / cnt, -np.inf)
        cnt[int(np.argmax(per))] += 1
    return cnt


def pack_lpt(
    load_E: np.ndarray,
    cnt_E: np.ndarray,
    topo: Topology,
    domains: FaultDomains | None = None,
    cover_E: np.ndarray | None = None,
) -> np.ndarray:
    """Longest-processing-time packing of replicas (weight load/cnt) onto ranks with free slots,
    never two replicas of one expert on one rank. Returns ``phy2log_S`` [S] laid out by rank.
    With ``domains`` and ``cover_E`` (bool [E]), the first two replicas of each covered expert go
    to two different domains (:func:`_pack_lpt_domains`)."""
    if domains is not None and cover_E is not None and np.any(cover_E):
        return _pack_lpt_domains(load_E, cnt_E, topo, domains, np.asarray(cover_E, dtype=bool))
    R = topo.num_ranks
    free = np.array(topo.slots_per_rank)
    rank_load = np.zeros(R)
    per = load_E / cnt_E
    items = np.repeat(np.arange(load_E.shape[0]), cnt_E)
    items = items[np.argsort(-per[items], kind="stable")]
    held: list[list[int]] = [[] for _ in range(R)]
    for e in items:
        ok = (free > 0) & np.array([e not in h for h in held])
        r = int(np.flatnonzero(ok)[np.argmin(rank_load[ok])])
        held[r].append(int(e))
        free[r] -= 1
        rank_load[r] += per[e]
    return np.array([e for h in held for e in h], dtype=np.int64)


def _pair_domains(cnt_E: np.ndarray, order: np.ndarray, cover_E: np.ndarray, slots_D: np.ndarray) -> dict:
    """expert -> the two domains of its first two replicas, for the covered experts in packing
    order: each time the two domains with the most slots not yet promised (ties: the lower id).
    Two-largest-first finds k pairs whenever ``sum_d min(slots_d, k) >= 2 k`` (domains.py)."""
    left = slots_D.astype(np.int64).copy()
    out: dict[int, tuple[int, int]] = {}
    for e in order:
        if cover_E[e] and cnt_E[e] >= 2 and int(e) not in out:
            a, b = np.argsort(-left, kind="stable")[:2]
            out[int(e)] = (int(a), int(b))
            left[[a, b]] -= 1
    return out


class _Packing:
    """Ranks being filled: what each holds, its free slots and its load (per-replica weights)."""

    def __init__(self, topo: Topology, per_E: np.ndarray, domains: FaultDomains):
        self.held: list[list[int]] = [[] for _ in range(topo.num_ranks)]
        self.free = np.array(topo.slots_per_rank)
        self.load = np.zeros(topo.num_ranks)
        self.per_E, self.domains = per_E, domains

    def lacking(self, e: int) -> np.ndarray:
        """bool [R]: ranks with a free slot that do not hold e."""
        return (self.free > 0) & np.array([e not in h for h in self.held])

    def put(self, e: int, ok: np.ndarray) -> None:
        """e on the least loaded rank of ``ok``."""
        r = int(np.flatnonzero(ok)[np.argmin(self.load[ok])])
        self.held[r].append(int(e))
        self.free[r] -= 1
        self.load[r] += self.per_E[e]

    def move(self, f: int, q: int, r: int) -> None:
        self.held[q].remove(f)
        self.held[r].append(f)
        self.free[[r, q]] += [-1, 1]
        self.load[[r, q]] += [self.per_E[f], -self.per_E[f]]

    def make_room(self, e: int) -> np.ndarray:
        """Every free slot is on a rank holding e: an expert f moves from a rank q lacking e to
        such a rank (f not there, f as multi-homed as before), so that q has room for e. Returns
        ``lacking(e)`` after the move (empty when no such f exists)."""
        dom = self.domains.domain_R
        for r in np.flatnonzero(self.free > 0):
            for q in range(len(self.held)):
                for f in list(self.held[q]):
                    if e in self.held[q] or f in self.held[int(r)]:
                        continue
                    homes = {int(dom[p]) for p in range(len(self.held)) if f in self.held[p] and p != q}
                    was_multi = len(homes | {int(dom[q])}) >= 2
                    if not was_multi or len(homes | {int(dom[r])}) >= 2:
                        self.move(f, q, int(r))
                        return self.lacking(e)
        return self.lacking(e)


def _pack_lpt_domains(
    load_E: np.ndarray, cnt_E: np.ndarray, topo: Topology, domains: FaultDomains, cover_E: np.ndarray
) -> np.ndarray:
    """:func:`pack_lpt` in two passes, each in LPT order: first the two replicas of each covered
    expert, on the two domains :func:`_pair_domains` gives it (always possible: each domain has
    as many slots as it was given pairs), then every other replica on the least loaded rank with
    room that lacks it (making room by moving another expert when every free slot is on a rank
    holding it; when even that fails, the slot takes the expert with the most load per replica
    that the rank lacks)."""
    per = load_E / cnt_E
    items = np.repeat(np.arange(load_E.shape[0]), cnt_E)
    items = items[np.argsort(-per[items], kind="stable")]
    slots_D = np.bincount(domains.domain_R, weights=np.array(topo.slots_per_rank, dtype=np.float64))
    pairs = _pair_domains(cnt_E, items, cover_E, slots_D)
    pk = _Packing(topo, per, domains)
    seen = np.zeros(load_E.shape[0], dtype=np.int64)
    rest: list[int] = []
    for e in items.tolist():
        j, seen[e] = int(seen[e]), seen[e] + 1
        if e in pairs and j < 2:
            pk.put(e, pk.lacking(e) & (domains.domain_R == pairs[e][j]))
        else:
            rest.append(e)
    for e in rest:
        ok = pk.lacking(e)
        if not ok.any():
            ok = pk.make_room(e)
        if not ok.any():  # no rank can take another replica of e: the slot goes to another expert
            r = int(np.flatnonzero(pk.free > 0)[0])
            e = max((g for g in range(len(per)) if g not in pk.held[r]), key=lambda g: (per[g], -g))
            ok = np.arange(len(pk.free)) == r
        pk.put(e, ok)
    return np.array([e for h in pk.held for e in h], dtype=np.int64)


def greedy_layer(load_E: np.ndarray, topo: Topology, domains: FaultDomains | None = None) -> np.ndarray:
    """EPLB-style: replicate the hottest experts into the extra slots, then LPT-pack. [S] With
    fault ``domains``, the hottest experts the slots allow are first given a replica on a
    second domain (domains.py)."""
    if domains is None or not domains.active:
        return pack_lpt(load_E, replica_counts(load_E, topo), topo)
    cover = domains.cover_E(load_E)
    row = pack_lpt(load_E, replica_counts(load_E, topo, cover), topo, domains, cover)
    return row if domains.valid(row) else domains.repair(row, load_E)


class _SwapState:
    """Incremental cost of one layer, slots as "virtual experts" (a slot's token set is the
    tokens its replica serves), exact or pairwise. Objective (per token) = traffic +
    load_weight * max_load + migration_weight * migration, identical to ``cost.evaluate``;
    ``delta_SS()`` predicts the change of exchanging the contents of every pair of slots (exact
    without replicas; with replicas the token split is re-derived after a swap, so the caller
    checks the real change)."""

    def __init__(
        self,
        stats: RoutingStats,
        l: int,
        topo: Topology,
        row_S: np.ndarray,
        fetch_ER: np.ndarray,
        load_weight: float,
        exact: bool,
    ):
        S, R = row_S.shape[0], topo.num_ranks
        self.S, self.R, self.row_S = S, R, row_S
        self.w_R = topo.send_weight_R
        self.rank_S = np.repeat(np.arange(R), topo.slots_per_rank)
        self.exact, self.lw = exact, load_weight
        cnt_E = np.bincount(row_S, minlength=stats.num_experts).astype(np.float64)
        if exact:
            assert stats.topk_ids_TLK is not None  # the exact phases run on per-token ids
            ids = virtual_ids(stats.topk_ids_TLK[:, l], row_S)
            self.M_TS = onehot_TE(ids, S)
            self.load_S = self.M_TS.sum(axis=0)
            self.T = max(self.M_TS.shape[0], 1)
            origin_T, w_OR, _ = origin_classes(stats, topo)  # cost of token t reaching rank r
            self.W_TR = w_OR[np.zeros(ids.shape[0], dtype=np.int64) if origin_T is None else origin_T]
            self.N_TR = self.M_TS @ (self.rank_S[:, None] == np.arange(R)).astype(np.float64)
            pairs = _slot_pairs(ids)
            # the pair bincount beats the dense [S, T] @ [T, S] product only while pairs are few
            self.pairs = pairs if len(pairs[0]) <= PAIR_DENSITY_MAX * self.M_TS.size else None
        else:
            c = cnt_E[row_S]
            self.load_S = stats.load_LE[l][row_S] / c
            self.coact_SS = stats.coact_LEE[l][np.ix_(row_S, row_S)] / np.outer(c, c)
            self.T = max(stats.num_tokens, 1)
        self.fetch_S = fetch_ER[row_S, self.rank_S]
        self.fetch_SR = fetch_ER[row_S]
        self.load_R = np.bincount(self.rank_S, weights=self.load_S, minlength=R)

    def swap(self, s: int, u: int) -> None:
        """Exchange the contents of slots s and u in place (exact model, no replicas: every other
        token keeps its slot, so only the two columns and their ranks' counts change)."""
        assert self.exact
        a, b = self.rank_S[s], self.rank_S[u]
        self.row_S = self.row_S.copy()
        for arr in (self.row_S, self.load_S, self.fetch_SR):
            arr[[s, u]] = arr[[u, s]]
        self.M_TS[:, [s, u]] = self.M_TS[:, [u, s]]
        if self.pairs is not None:
            perm = np.arange(self.S)
            perm[s], perm[u] = u, s
            self.pairs = (self.pairs[0], perm[self.pairs[1]], perm[self.pairs[2]])
        diff = self.M_TS[:, s] - self.M_TS[:, u]  # tokens now on a (from u) minus those now on b
        self.N_TR[:, a] += diff
        self.N_TR[:, b] -= diff
        self.fetch_S = self.fetch_SR[np.arange(self.S), self.rank_S]
        self.load_R = np.bincount(self.rank_S, weights=self.load_S, minlength=self.R)

    def objective(self) -> float:
        if self.exact:
            traffic = float(((self.N_TR > 0) * self.W_TR).sum())
        else:
            H = (self.rank_S[:, None] == np.arange(self.R)).astype(np.float64)
            traffic = float(self.w_R @ (self.load_R - 0.5 * np.einsum("sr,st,tr->r", H, self.coact_SS, H)))
        return float(traffic + self.lw * self.load_R.max()) / self.T + float(self.fetch_S.sum())

    def _rest_max(self) -> np.ndarray:
        """[R, R]: the largest rank load over ranks other than i and j."""
        order = np.argsort(-self.load_R, kind="stable")[:3]
        rest = np.zeros((self.R, self.R))
        for i in range(self.R):
            for j in range(self.R):
                rest[i, j] = next((self.load_R[r] for r in order if r != i and r != j), 0.0)
        return rest

    def delta_SS(self) -> np.ndarray:
        """Predicted objective change of exchanging slots s and u, [S, S] (+inf: same rank)."""
        a, w, S = self.rank_S, self.w_R, self.S
        idx = np.arange(S)
        if self.exact:
            Z = (self.N_TR == 0) * self.W_TR  # [T, R]: t would newly need r
            G = (self.N_TR == 1) * self.W_TR  # t needs r through one slot only
            move_SR = self.M_TS.T @ Z - (self.M_TS.T @ G)[idx, a][:, None]  # s moves to rank r
            # X[s, u] = sum over tokens served by both s and u of G[t, a(s)] (s != u)
            if self.pairs is not None:  # top-4 over 60 slots: ~4x faster than the dense product
                t_Q, s_Q, u_Q = self.pairs
                X = np.bincount(s_Q * S + u_Q, weights=G[t_Q, a[s_Q]], minlength=S * S).reshape(S, S)
            else:
                X = (G[:, a] * self.M_TS).T @ self.M_TS
                X[idx, idx] = 0.0
            d_tr = move_SR[:, a] + move_SR[:, a].T + X + X.T
        else:
            H = (a[:, None] == np.arange(self.R)).astype(np.float64)
            P = self.coact_SS @ H  # [S, R] co-activation of s with the slots of r
            l, c = self.load_S, self.coact_SS
            Psa, Pua = P[idx, a][:, None], P[:, a].T  # P[s, a(s)], P[u, a(s)]
            Pub, Psb = P[idx, a][None, :], P[:, a]  # P[u, a(u)], P[s, a(u)]
            d_tr = w[a][:, None] * (-l[:, None] + Psa + l[None, :] - Pua + c) + w[a][None, :] * (
                -l[None, :] + Pub + l[:, None] - Psb + c
            )
        dl = self.load_S[None, :] - self.load_S[:, None]  # change on a(s): -l_s + l_u
        new_max = np.maximum(
            np.maximum(self.load_R[a][:, None] + dl, self.load_R[a][None, :] - dl),
            self._rest_max()[a[:, None], a[None, :]],
        )
        d_load = new_max - self.load_R.max()
        f = self.fetch_SR
        d_mig = f[idx[:, None], a[None, :]] - f[idx, a][:, None] + f[idx[None, :], a[:, None]] - f[idx, a][None, :]
        d = (d_tr + self.lw * d_load) / self.T + d_mig
        d[a[:, None] == a[None, :]] = np.inf
        return d


def _slot_pairs(slot_TK: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, slot, other slot) of every ordered pair of distinct slots one token is sent to
    (slot ids [T, K], -1 = none), three int64 arrays [Q]."""
    T, K = slot_TK.shape
    i, j = np.nonzero(~np.eye(K, dtype=bool))
    s, u = slot_TK[:, i].ravel(), slot_TK[:, j].ravel()
    t = np.repeat(np.arange(T), len(i))
    ok = (s >= 0) & (u >= 0) & (s != u)
    return t[ok], s[ok].astype(np.int64), u[ok].astype(np.int64)


def _bad_swaps(
    row_S: np.ndarray, rank_S: np.ndarray, num_experts: int, num_ranks: int, domains: FaultDomains | None = None
) -> np.ndarray:
    """[S, S] True where exchanging slots s, u is pointless (same expert), would put two
    replicas of one expert on one rank, or (``domains``) leave a multi-homed expert single-homed."""
    hold = holders_ER(row_S, rank_S, num_experts, num_ranks) > 0
    e, a = row_S, rank_S
    bad = (e[:, None] == e[None, :]) | hold[e[None, :], a[:, None]] | hold[e[:, None], a[None, :]]
    if domains is not None and domains.active:
        bad |= domains.unhoming_swaps(row_S)
    return bad


def local_search_layer(
    stats: RoutingStats,
    l: int,
    topo: Topology,
    start_S: np.ndarray,
    *,
    cur_S: np.ndarray | None = None,
    load_weight: float = 1.0,
    migration_weight: float = 0.0,
    expert_bytes: float = 1.0,
    exact: bool | None = None,
    deadline: float = float("inf"),
    max_iters: int = 20_000,
    tol: float = 1e-12,
    domains: FaultDomains | None = None,
) -> np.ndarray:
    """Best-improvement exchange of slot contents between ranks, from ``start_S`` [S], until no
    exchange improves the objective or ``deadline`` (time.monotonic) passes. With replicas a
    predicted improvement is checked on the rebuilt state and the pair skipped if it fails.
    ``domains``: no exchange leaves a multi-homed expert single-homed (domains.py)."""
    E, R = stats.num_experts, topo.num_ranks
    exact = stats.topk_ids_TLK is not None if exact is None else exact
    rank_S = np.repeat(np.arange(R), topo.slots_per_rank)
    fetch_ER = np.zeros((E, R))
    if cur_S is not None:
        fetch_ER = (holders_ER(cur_S, rank_S, E, R) == 0) * (expert_bytes * migration_weight)
    replicated = topo.num_slots != E
    row = start_S.copy()
    st = _SwapState(stats, l, topo, row, fetch_ER, load_weight, exact)
    obj = st.objective()
    tabu = np.zeros((len(row), len(row)), dtype=bool)
    for _ in range(max_iters):
        if time.monotonic() > deadline:
            break
        d = st.delta_SS()
        if replicated:
            d[_bad_swaps(row, rank_S, E, R, domains) | tabu] = np.inf
        s, u = np.unravel_index(int(np.argmin(d)), d.shape)
        if not d[s, u] < -tol:
            break
        cand = row.copy()
        cand[s], cand[u] = row[u], row[s]
        nst = _SwapState(stats, l, topo, cand, fetch_ER, load_weight, exact)
        nobj = nst.objective()
        if replicated and not nobj < obj - tol:
            tabu[s, u] = tabu[u, s] = True
            continue
        row, st, obj = cand, nst, nobj
        tabu[:] = False
    return row


def tabu_search_layer(
    stats: RoutingStats,
    l: int,
    topo: Topology,
    start_S: np.ndarray,
    *,
    iters: int,
    seed: int,
    tenure: int = 8,
    cur_S: np.ndarray | None = None,
    load_weight: float = 1.0,
    migration_weight: float = 0.0,
    expert_bytes: float = 1.0,
    deadline: float = float("inf"),
    tol: float = 1e-12,
    domains: FaultDomains | None = None,
) -> tuple[np.ndarray, float]:
    """Tabu search over exchanges of slot contents between ranks: ``iters`` moves, each the best
    exchange (improving or not) whose slots were not moved in the last ``tenure`` (+0..2, seeded)
    moves, unless it beats the best seen (aspiration). Ties are broken by a seeded random
    perturbation, so a given seed gives one answer unless ``deadline`` cuts the run.
    ``domains``: as in :func:`local_search_layer`.
    Returns the best row [S] seen and its objective (the exact one of cost.py)."""
    E, R = stats.num_experts, topo.num_ranks
    exact = stats.topk_ids_TLK is not None
    rank_S = np.repeat(np.arange(R), topo.slots_per_rank)
    fetch_ER = np.zeros((E, R))
    if cur_S is not None:
        fetch_ER = (holders_ER(cur_S, rank_S, E, R) == 0) * (expert_bytes * migration_weight)
    replicated = topo.num_slots != E
    rng = np.random.default_rng(seed)
    row = start_S.copy()
    st = _SwapState(stats, l, topo, row, fetch_ER, load_weight, exact)
    cur = st.objective()
    best, best_obj = row.copy(), cur
    until = np.zeros(len(row), dtype=np.int64)  # slot may not move again before this move
    for it in range(iters):
        if time.monotonic() > deadline:
            break
        d = st.delta_SS()
        if replicated:
            d[_bad_swaps(row, rank_S, E, R, domains)] = np.inf
        locked = (until[:, None] > it) | (until[None, :] > it)
        d = np.where(locked & ~(cur + d < best_obj - tol), np.inf, d)
        d = d + rng.random(d.shape) * tol  # seeded tie-break
        s, u = np.unravel_index(int(np.argmin(d)), d.shape)
        if not np.isfinite(d[s, u]):
            break
        if exact and not replicated:
            st.swap(int(s), int(u))
            row = st.row_S
        else:  # with replicas a swap can re-route other tokens (t mod c in slot order): rebuild
            row = row.copy()
            row[s], row[u] = row[u], row[s]
            st = _SwapState(stats, l, topo, row, fetch_ER, load_weight, exact)
        cur = st.objective()
        until[s] = until[u] = it + tenure + int(rng.integers(0, 3))
        if cur < best_obj - tol:
            best, best_obj = row.copy(), cur
    return best, best_obj
