"""One layer's routing as a weighted hypergraph: the exact form of cost.py's dedup send model.

Owns: :class:`LayerHypergraph` (vertices = expert replicas, hyperedges = distinct top-k sets with
their token counts), building it from per-token ids, its exact objective, and the conversions
between a layer row ``phy2log_S`` and a rank per vertex.

Legend: T tokens, K top-k, E experts, V vertices (one per replica: V = sum of replica counts),
R ranks, S slots, H distinct hyperedges (with 2+ pins), P pins of those hyperedges.

**Vertices.** Expert e with c replicas gives the vertices ``first[e] + j`` (j < c). Token t's
choice of e is a pin on vertex ``first[e] + (t mod c)``: cost.py's dispatch rule (the
``t mod c``-th replica *in slot order*, :func:`placement.cost.virtual_ids`). Slots are laid out
by rank and replicas of one expert sit on distinct ranks, so "j-th in slot order" is "j-th in
rank order": a rank per vertex is a valid layer row exactly when the replicas of every expert
sit on strictly increasing ranks (the ILP states that as a linear constraint).

**Hyperedges.** Token t pins the set of its vertices; identical sets are merged, weighted by
how many tokens share them (``weight_H``). Sets of one vertex are kept apart (``single_V``: a
linear cost), empty ones (a token that skipped the layer) cost nothing.

**Home ranks** (origin classes, cost.py). With home ranks, token t of home o is the hyperedge
of its pins plus a *fixed home vertex* pinned to rank o. Its cost is ``sum_{r touched}
link_cost[o, r]``; the home vertex touches o at ``link_cost[o, o] = 0``, so it adds nothing
but makes connectivity - 1 = the ranks other than o that t reaches = its sends (km1 with home
vertices is the dedup send count). In the ILP the home vertex is a constant column, so the
equivalent model keeps the pins and gives each hyperedge the cost row of its origin:
hyperedges are distinct (pin set, origin) pairs (``origin_H``), single-pin tokens are counted
per origin (``single_VO``) and every per-rank weight below is ``w[origin, r]`` (``w_OR``: the
link costs with home ranks; one row, ``send_weight_R``, without).

**Objective** (per token, exactly ``evaluate()``'s layer objective for the statistics the
hypergraph was built from; tested):

    sum_h weight[h] sum_{r touched by h} w[origin[h], r] / T         traffic (dedup)
    + load_weight * max_r sum_{v on r} load[v] / T                   busiest rank
    + sum_v fetch[v, rank(v)]                                        migration

With uniform send weights w (one node, uniform origin: w = 1 - 1/R) the traffic term is
``w * (km1 + sum_h weight[h]) / T`` where km1 = sum_h weight[h] (connectivity(h) - 1), the
objective Mt-KaHyPar minimises: minimising km1 minimises the expected off-rank sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class LayerHypergraph:
    """One layer's hypergraph; hyperedges are sorted by weight, heaviest first (stable)."""

    expert_V: np.ndarray  # int64 [V] logical expert of each vertex
    replica_V: np.ndarray  # int64 [V] replica index j of each vertex
    load_V: np.ndarray  # float64 [V] token-expert pairs served by each vertex
    single_V: np.ndarray  # float64 [V] tokens whose only pin is this vertex
    edge_ptr: np.ndarray  # int64 [H + 1] CSR offsets into edge_pins
    edge_pins: np.ndarray  # int64 [P] vertex ids, ascending within an edge
    weight_H: np.ndarray  # float64 [H] tokens sharing the pin set (and origin)
    num_tokens: int  # rows holding an id in the layer: the per-token divisor (cost.layer_tokens)
    origin_H: np.ndarray | None = None  # int64 [H] origin class of each hyperedge (None: all 0)
    single_VO: np.ndarray | None = None  # float64 [V, O] single_V split by origin class (None: O = 1)

    @property
    def num_vertices(self) -> int:
        return int(self.expert_V.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.weight_H.shape[0])

    @property
    def replicated(self) -> bool:
        return bool((self.replica_V > 0).any())

    def edge_of_pin(self) -> np.ndarray:
        """Hyperedge of each pin, [P]."""
        return np.repeat(np.arange(self.num_edges), np.diff(self.edge_ptr))

    @property
    def num_origins(self) -> int:
        return 1 if self.single_VO is None else int(self.single_VO.shape[1])

    def _w_OR(self, w: np.ndarray) -> np.ndarray:
        w_OR = np.atleast_2d(np.asarray(w, dtype=np.float64))
        if w_OR.shape[0] != self.num_origins:
            raise ValueError(f"send weights have {w_OR.shape[0]} origin rows, the hypergraph {self.num_origins}")
        return w_OR

    def edge_cost_HR(self, w: np.ndarray) -> np.ndarray:
        """Cost of hyperedge h touching rank r, [H, R]: ``weight[h] * w[origin[h], r]``
        (``w``: [R] or [O, R])."""
        w_OR = self._w_OR(w)
        o_H = np.zeros(self.num_edges, dtype=np.int64) if self.origin_H is None else self.origin_H
        return self.weight_H[:, None] * w_OR[o_H]

    def single_cost_VR(self, w: np.ndarray) -> np.ndarray:
        """Cost of the single-pin tokens of vertex v if v sits on rank r, [V, R]."""
        w_OR = self._w_OR(w)
        single_VO = self.single_V[:, None] if self.single_VO is None else self.single_VO
        return single_VO @ w_OR

    def touched_HR(self, rank_V: np.ndarray, num_ranks: int) -> np.ndarray:
        """0/1 [H, R]: hyperedge h has a pin on rank r."""
        out = np.zeros((self.num_edges, num_ranks))
        out[self.edge_of_pin(), rank_V[self.edge_pins]] = 1.0
        return out

    def objective(
        self, rank_V: np.ndarray, w_R: np.ndarray, load_weight: float, fetch_VR: np.ndarray | None = None
    ) -> float:
        """The layer objective of a rank per vertex (module docstring), per token; ``w_R`` is
        [R] or, with origin classes, [O, R]."""
        T = max(self.num_tokens, 1)
        R = np.shape(w_R)[-1]
        traffic = float((self.edge_cost_HR(w_R) * self.touched_HR(rank_V, R)).sum()) + float(
            self.single_cost_VR(w_R)[np.arange(self.num_vertices), rank_V].sum()
        )
        load_R = np.bincount(rank_V, weights=self.load_V, minlength=R)
        mig = 0.0 if fetch_VR is None else float(fetch_VR[np.arange(self.num_vertices), rank_V].sum())
        return traffic / T + load_weight * float(load_R.max()) / T + mig

    def km1(self, rank_V: np.ndarray, num_ranks: int) -> float:
        """sum_h weight[h] (connectivity(h) - 1): Mt-KaHyPar's objective on this hypergraph."""
        return float(self.weight_H @ (self.touched_HR(rank_V, num_ranks).sum(axis=1) - 1.0))


def first_vertex_E(cnt_E: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(cnt_E)[:-1]]).astype(np.int64)


def build_hypergraph(
    ids_TK: np.ndarray, cnt_E: np.ndarray, origin_T: np.ndarray | None = None, num_origins: int = 1
) -> LayerHypergraph:
    """The hypergraph of one layer's top-k ids [T, K] (-1 = missing) under replica counts
    ``cnt_E`` (module docstring); ``origin_T`` [T]: origin class (home rank) of each token, in
    ``[0, num_origins)`` (None: one class)."""
    ids = np.asarray(ids_TK, dtype=np.int64)
    if origin_T is not None:
        o_T = np.asarray(origin_T, dtype=np.int64)
        if o_T.shape != (ids.shape[0],) or (o_T.size and not 0 <= o_T.min() <= o_T.max() < num_origins):
            raise ValueError(f"origin_T must hold {ids.shape[0]} classes in [0, {num_origins})")
        return _build_with_origins(ids, np.asarray(cnt_E, dtype=np.int64), o_T, int(num_origins))
    cnt = np.asarray(cnt_E, dtype=np.int64)
    T = ids.shape[0]
    first = first_vertex_E(cnt)
    V = int(cnt.sum())
    safe = np.maximum(ids, 0)
    v_TK = np.where(ids >= 0, first[safe] + np.arange(T)[:, None] % cnt[safe], -1)
    load_V = np.bincount(v_TK[v_TK >= 0], minlength=V).astype(np.float64)
    size_T = (v_TK >= 0).sum(axis=1)
    one = size_T == 1
    single_V = np.bincount(v_TK[one].max(axis=1), minlength=V).astype(np.float64)
    multi = np.sort(v_TK[size_T >= 2], axis=1)  # -1 pads first
    if multi.shape[0]:
        sets, count = np.unique(multi, axis=0, return_counts=True)
        order = np.argsort(-count, kind="stable")
        sets, weight = sets[order], count[order].astype(np.float64)
    else:
        sets, weight = np.zeros((0, ids.shape[1]), dtype=np.int64), np.zeros(0)
    valid = sets >= 0
    ptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int64)
    expert_V = np.repeat(np.arange(cnt.shape[0]), cnt)
    replica_V = np.arange(V) - first[expert_V]
    # per-token figures are divided by the rows holding an id (cost.layer_tokens), as evaluate() does
    T_ids = int((ids >= 0).any(axis=1).sum())
    return LayerHypergraph(expert_V, replica_V, load_V, single_V, ptr, sets[valid].astype(np.int64), weight, T_ids)


def _build_with_origins(ids: np.ndarray, cnt: np.ndarray, o_T: np.ndarray, O: int) -> LayerHypergraph:
    """build_hypergraph with origin classes: hyperedges are distinct (pin set, origin) pairs."""
    base = build_hypergraph(ids, cnt)  # vertices, load and the pin rule are origin-blind
    T, V = ids.shape[0], base.num_vertices
    first = first_vertex_E(cnt)
    safe = np.maximum(ids, 0)
    v_TK = np.where(ids >= 0, first[safe] + np.arange(T)[:, None] % cnt[safe], -1)
    size_T = (v_TK >= 0).sum(axis=1)
    one = size_T == 1
    single_VO = np.zeros((V, O))
    np.add.at(single_VO, (v_TK[one].max(axis=1), o_T[one]), 1.0)
    keep = size_T >= 2
    multi = np.concatenate([np.sort(v_TK[keep], axis=1), o_T[keep][:, None]], axis=1)
    if multi.shape[0]:
        rows, count = np.unique(multi, axis=0, return_counts=True)
        order = np.argsort(-count, kind="stable")
        rows, weight = rows[order], count[order].astype(np.float64)
    else:
        rows, weight = np.zeros((0, ids.shape[1] + 1), dtype=np.int64), np.zeros(0)
    sets, origin_H = rows[:, :-1], rows[:, -1].astype(np.int64)
    valid = sets >= 0
    ptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int64)
    return LayerHypergraph(
        base.expert_V,
        base.replica_V,
        base.load_V,
        single_VO.sum(axis=1),
        ptr,
        sets[valid].astype(np.int64),
        weight,
        base.num_tokens,
        origin_H,
        single_VO,
    )


def rank_of_vertices(row_S: np.ndarray, slot_rank_S: np.ndarray) -> np.ndarray:
    """Rank per vertex of a layer row [S] (vertex ``first[e] + j`` = e's j-th slot), [V]."""
    return slot_rank_S[np.argsort(row_S, kind="stable")]


def row_from_ranks(rank_V: np.ndarray, expert_V: np.ndarray, slots_R: np.ndarray) -> np.ndarray:
    """The layer row [S] (by rank, vertices in id order within a rank) of a rank per vertex."""
    R = slots_R.shape[0]
    got = np.bincount(rank_V, minlength=R)
    if not np.array_equal(got, slots_R):
        raise ValueError(f"vertices per rank {got.tolist()} != slots {np.asarray(slots_R).tolist()}")
    return expert_V[np.argsort(rank_V, kind="stable")]
