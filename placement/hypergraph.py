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

**Objective** (per token, exactly ``evaluate()``'s layer objective for the statistics the
hypergraph was built from; tested):

    sum_h weight[h] sum_{r touched by h} send_weight[r] / T         traffic (dedup)
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
    weight_H: np.ndarray  # float64 [H] tokens sharing the pin set
    num_tokens: int

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

    def touched_HR(self, rank_V: np.ndarray, num_ranks: int) -> np.ndarray:
        """0/1 [H, R]: hyperedge h has a pin on rank r."""
        out = np.zeros((self.num_edges, num_ranks))
        out[self.edge_of_pin(), rank_V[self.edge_pins]] = 1.0
        return out

    def objective(self, rank_V: np.ndarray, w_R: np.ndarray, load_weight: float,
                  fetch_VR: np.ndarray | None = None) -> float:
        """The layer objective of a rank per vertex (module docstring), per token."""
        T = max(self.num_tokens, 1)
        R = w_R.shape[0]
        traffic = float(self.weight_H @ (self.touched_HR(rank_V, R) @ w_R)) + float(self.single_V @ w_R[rank_V])
        load_R = np.bincount(rank_V, weights=self.load_V, minlength=R)
        mig = 0.0 if fetch_VR is None else float(fetch_VR[np.arange(self.num_vertices), rank_V].sum())
        return traffic / T + load_weight * float(load_R.max()) / T + mig

    def km1(self, rank_V: np.ndarray, num_ranks: int) -> float:
        """sum_h weight[h] (connectivity(h) - 1): Mt-KaHyPar's objective on this hypergraph."""
        return float(self.weight_H @ (self.touched_HR(rank_V, num_ranks).sum(axis=1) - 1.0))


def first_vertex_E(cnt_E: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(cnt_E)[:-1]]).astype(np.int64)


def build_hypergraph(ids_TK: np.ndarray, cnt_E: np.ndarray) -> LayerHypergraph:
    """The hypergraph of one layer's top-k ids [T, K] (-1 = missing) under replica counts
    ``cnt_E`` (module docstring)."""
    ids = np.asarray(ids_TK, dtype=np.int64)
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
        sets, weight = np.unique(multi, axis=0, return_counts=True)
        order = np.argsort(-weight, kind="stable")
        sets, weight = sets[order], weight[order].astype(np.float64)
    else:
        sets, weight = np.zeros((0, ids.shape[1]), dtype=np.int64), np.zeros(0)
    valid = sets >= 0
    ptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int64)
    expert_V = np.repeat(np.arange(cnt.shape[0]), cnt)
    replica_V = np.arange(V) - first[expert_V]
    return LayerHypergraph(expert_V, replica_V, load_V, single_V, ptr, sets[valid].astype(np.int64), weight, T)


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
