"""The pairwise ILP pipeline for statistics without per-token ids (aggregates only).

Owns: building ilp.py's pairwise model for one layer of a solve, the flat solve and the
hierarchical nodes-then-ranks split. The ILP pipeline (phases.py) calls these when the exact hypergraph model
(hyper_ilp.py) cannot be built, i.e. when the statistics hold no per-token top-k ids.

Legend: E experts, R ranks, N nodes.
"""

from __future__ import annotations

import math

import numpy as np

from placement.baselines import pack_lpt
from placement.cost import holders_ER
from placement.ilp import LayerModel, model_objective, solve_layer_model, top_pairs
from placement.layer_context import LayerContext
from placement.topology import Topology


def rows_from_sets(rank_sets: list, num_ranks: int) -> np.ndarray:
    return np.array([e for r in range(num_ranks) for e, rs in enumerate(rank_sets) if r in rs], dtype=np.int64)


def _layer_model(
    c: LayerContext,
    l: int,
    cnt_E: np.ndarray,
    experts: np.ndarray,
    ranks: np.ndarray,
    w_R: np.ndarray,
    slots_R: np.ndarray,
    fetch_ER: np.ndarray,
    cover_E: np.ndarray | None = None,
) -> LayerModel:
    """ilp.py's model of layer l on ``experts`` x ``ranks``; ``cover_E`` (bool, over all E, flat
    models only): experts kept on two fault domains of ``c.domains``."""
    s = c.stats
    T = max(int(s.tokens_L[l]), 1)  # the layer's tokens (cost.layer_tokens)
    load = s.load_LE[l][experts]
    cnt = cnt_E[experts]
    pairs, q = top_pairs(s.coact_LEE[l][np.ix_(experts, experts)], cnt, c.num_pairs)
    share = load / cnt / T
    cap = None
    if c.balance_cap is not None:
        lpt = pack_lpt(load, cnt, Topology(len(ranks), tuple(int(x) for x in slots_R)))
        lpt_max = np.bincount(np.repeat(np.arange(len(ranks)), slots_R), weights=(load / cnt)[lpt]).max() / T
        cap = max(c.balance_cap * float(share @ cnt) / len(ranks), float(lpt_max) * (1 + 1e-9))
    span = None
    if c.domains is not None and cover_E is not None and cover_E.any():
        span = (c.domains.domain_R[ranks], np.asarray(cover_E)[experts])
    return LayerModel(
        share, cnt, pairs, q / T, w_R, np.asarray(slots_R), fetch_ER[np.ix_(experts, ranks)], c.load_weight, cap, span
    )


def layer_fetch_ER(c: LayerContext, l: int) -> np.ndarray:
    E, R = c.stats.num_experts, c.topo.num_ranks
    if c.cur_LS is None:
        return np.zeros((E, R))
    srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
    return (holders_ER(c.cur_LS[l], srank, E, R) == 0) * (c.expert_bytes * c.migration_weight)


def ilp_flat(c: LayerContext, l: int, cnt_E, warm_S, time_s):
    """The flat pairwise ILP from ``warm_S`` (with fault domains, its multi-homed experts kept so)."""
    E, R = c.stats.num_experts, c.topo.num_ranks
    m = flat_model(c, l, cnt_E, None if c.domains is None else c.domains.multi_homed_E(warm_S))
    srank = np.repeat(np.arange(R), c.topo.slots_per_rank)
    res = solve_layer_model(
        m, warm_ER=holders_ER(warm_S, srank, E, R), time_limit_s=time_s, mip_gap=c.mip_gap, solver=c.solver
    )
    row = rows_from_sets(res.rank_sets, R) if res.rank_sets else None
    return row, res.objective, res.bound, res.status


def ilp_hierarchical(c: LayerContext, l: int, cnt_E, warm_S, time_s):
    """Experts -> nodes (inter-node costs only), then each node's experts -> its ranks. No
    fault-domain constraint: the first stage puts an expert's replicas on distinct nodes, which
    are distinct domains for "node" and "rank" alike (and the caller checks every row)."""
    topo, E, R = c.topo, c.stats.num_experts, c.topo.num_ranks
    N, node_R = topo.num_nodes, topo.node_R
    origin_N = np.bincount(node_R, weights=np.asarray(topo.origin_R), minlength=N)
    w_N = (1.0 - origin_N) * topo.inter_node_cost
    slots_N = np.bincount(node_R, weights=np.array(topo.slots_per_rank), minlength=N).astype(np.int64)
    fetch_ER = layer_fetch_ER(c, l)
    fetch_EN = np.stack([fetch_ER[:, node_R == n].min(axis=1) for n in range(N)], axis=1)
    m1 = _layer_model(c, l, cnt_E, np.arange(E), np.arange(N), w_N, slots_N, fetch_EN)
    m1 = LayerModel(
        m1.share_E, m1.cnt_E, m1.pairs_P2, m1.q_P, m1.w_R, m1.slots_R, m1.fetch_ER, c.load_weight * N / R, None
    )  # a node holds R / N ranks on average
    srank = np.repeat(np.arange(R), topo.slots_per_rank)
    warm_node = holders_ER(warm_S, node_R[srank], E, N)
    r1 = solve_layer_model(m1, warm_ER=warm_node, time_limit_s=time_s / 2, mip_gap=c.mip_gap, solver=c.solver)
    if not r1.rank_sets:
        return None, math.nan, math.nan, r1.status
    rank_sets: list[list[int]] = [[] for _ in range(E)]
    for n in range(N):
        experts = np.array([e for e in range(E) if n in r1.rank_sets[e]], dtype=np.int64)
        ranks = np.flatnonzero(node_R == n)
        m2 = _layer_model(
            c, l, cnt_E, experts, ranks, topo.send_weight_R[ranks], np.array(topo.slots_per_rank)[ranks], fetch_ER
        )
        r2 = solve_layer_model(m2, time_limit_s=time_s / (2 * N), mip_gap=c.mip_gap, solver=c.solver)
        if not r2.rank_sets:
            return None, math.nan, math.nan, r2.status
        for i, e in enumerate(experts):
            rank_sets[e] = [int(ranks[r]) for r in r2.rank_sets[i]]
    flat = _layer_model(
        c, l, cnt_E, np.arange(E), np.arange(R), topo.send_weight_R, np.array(topo.slots_per_rank), fetch_ER
    )
    row = rows_from_sets(rank_sets, R)
    obj = model_objective(flat, holders_ER(row, srank, E, R))
    # stages solved to optimality do not make the split optimal for the flat model: no bound here
    # (the caller computes the flat LP relaxation)
    return row, obj, math.nan, "feasible"


def flat_model(c: LayerContext, l: int, cnt_E: np.ndarray, cover_E: np.ndarray | None = None) -> LayerModel:
    """The flat model of layer l (all experts on all ranks); ``cover_E``: as in :func:`_layer_model`."""
    E, R = c.stats.num_experts, c.topo.num_ranks
    return _layer_model(
        c,
        l,
        cnt_E,
        np.arange(E),
        np.arange(R),
        c.topo.send_weight_R,
        np.array(c.topo.slots_per_rank),
        layer_fetch_ER(c, l),
        cover_E,
    )
