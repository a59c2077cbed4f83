"""FM refinement (placement/refine.py): move gains by hand, the known optimum of a tiny
hypergraph, slots and replica order kept, exactness against evaluate(), determinism."""

import numpy as np
import pytest

from placement.cost import evaluate
from placement.hypergraph import build_hypergraph, rank_of_vertices, row_from_ranks
from placement.placement import Placement
from placement.refine import _Moves, fm_refine, iterated_fm, perturb_ranks
from placement.solve import solve_placement
from placement.stats import from_topk_ids
from placement.topology import Topology

# 7 tokens: {0, 1} x 3, {2, 3} x 3, {0, 2} x 1
TINY = np.array([[0, 1]] * 3 + [[2, 3]] * 3 + [[0, 2]])


def test_move_gain_and_known_optimum_by_hand():
    hg = build_hypergraph(TINY, np.ones(4, dtype=np.int64))
    w = Topology(2, 2).send_weight_R  # 1 - 1/2 each
    start = np.array([0, 1, 0, 1])  # {0, 2} | {1, 3}: both heavy edges cut, km1 = 3 + 3
    assert hg.km1(start, 2) == 6
    st = _Moves(hg, start, w, 0.0, np.zeros((4, 2)))
    d = st.delta_VR()
    # vertex 1 to rank 0: {0, 1} (3 tokens) no longer reaches rank 1, nothing new reaches rank 0
    assert d[1, 0] == pytest.approx(-0.5 * 3 / 7)
    # vertex 0 to rank 1: {0, 2} (1 token) now reaches rank 1 too, {0, 1} leaves rank 0
    assert d[0, 1] == pytest.approx((0.5 * 1 - 0.5 * 3) / 7)
    assert np.isinf(d[0, 0]) and np.isinf(d[1, 1])
    # the optimum {0, 1} | {2, 3} (km1 = 1) needs a move then its counter-move (an ejection chain)
    out = fm_refine(hg, start, w, np.array([2, 2]), 0.0)
    assert np.bincount(out, minlength=2).tolist() == [2, 2]
    assert out[0] == out[1] and out[2] == out[3] and hg.km1(out, 2) == 1
    assert hg.objective(out, w, 0.0) == pytest.approx(0.5 * (1 + 7) / 7)


def _replicated_case():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(6, 0.5))
    ids = np.stack([rng.choice(6, 3, replace=False, p=p) for _ in range(120)])[:, None, :]
    stats = from_topk_ids(ids, 6)
    # 8 slots (2 extra replicas), two link costs and a skewed origin: unequal send weights
    topo = Topology(4, 2, ranks_per_node=2, inter_node_cost=3.0, origin_R=(0.4, 0.3, 0.2, 0.1))
    cnt = np.array([2, 2, 1, 1, 1, 1])
    start_row = np.array([0, 2, 1, 3, 0, 4, 1, 5])  # replicas of 0 on ranks 0, 2; of 1 on 1, 3
    return stats, topo, cnt, start_row


def test_every_move_gain_is_exact_with_replicas_load_and_migration():
    stats, topo, cnt, start_row = _replicated_case()
    hg = build_hypergraph(stats.topk_ids_TLK[:, 0], cnt)
    w = topo.send_weight_R
    assert not np.allclose(w, w[0])  # two link costs
    fetch = np.random.default_rng(5).random((hg.num_vertices, 4)) * 0.1
    start = rank_of_vertices(start_row, np.repeat(np.arange(4), 2))
    st = _Moves(hg, start, w, 0.7, fetch)
    d = st.delta_VR()
    base = hg.objective(start, w, 0.7, fetch)
    for v in range(hg.num_vertices):
        for r in range(4):
            if r != start[v]:
                moved = start.copy()
                moved[v] = r
                assert d[v, r] == pytest.approx(hg.objective(moved, w, 0.7, fetch) - base, abs=1e-12)


def test_refine_keeps_slots_and_replica_order_and_equals_evaluate():
    stats, topo, cnt, start_row = _replicated_case()
    hg = build_hypergraph(stats.topk_ids_TLK[:, 0], cnt)
    srank = np.repeat(np.arange(4), 2)
    slots = np.array(topo.slots_per_rank)
    start = rank_of_vertices(start_row, srank)
    w = topo.send_weight_R
    res = iterated_fm(hg, start, w, slots, 0.4, None, np.random.default_rng(0), rounds=6, swaps=2)
    out = res.rank_V
    assert np.bincount(out, minlength=4).tolist() == [2, 2, 2, 2]
    for v in np.flatnonzero(hg.replica_V > 0):
        assert out[v] > out[v - 1]  # replicas of one expert on distinct, increasing ranks
    assert res.objective <= hg.objective(start, w, 0.4) + 1e-12
    assert res.rounds == 6 and not res.capped
    row = row_from_ranks(out, hg.expert_V, slots)
    got = evaluate(stats, Placement(row[None], topo.slots_per_rank, 6), topo, load_weight=0.4).objective
    assert got == pytest.approx(res.objective, abs=1e-12)
    again = iterated_fm(hg, start, w, slots, 0.4, None, np.random.default_rng(0), rounds=6, swaps=2)
    assert np.array_equal(again.rank_V, out)


def test_perturb_keeps_counts_and_replicas():
    replica = np.array([0, 1, 0, 0, 0, 0])  # vertices 0, 1: one expert's two replicas
    start = np.array([0, 1, 0, 1, 2, 2])
    out = perturb_ranks(start, replica, np.random.default_rng(1), 5)
    assert out[0] == 0 and out[1] == 1
    assert np.bincount(out, minlength=3).tolist() == [2, 2, 2]


def test_refine_refuses_an_unbalanced_start():
    hg = build_hypergraph(TINY, np.ones(4, dtype=np.int64))
    with pytest.raises(ValueError, match="slots_R"):
        fm_refine(hg, np.array([0, 0, 0, 1]), np.array([0.5, 0.5]), np.array([2, 2]), 0.0)


def test_pipeline_reports_the_refine_phase(monkeypatch):
    from placement import phases

    monkeypatch.setattr(phases, "MAX_WORK", 0)  # no exact set partition: the search phases run
    stats = from_topk_ids(np.stack([TINY] * 2, axis=1), 4)
    res = solve_placement(stats, Topology(2, 2), "ilp", time_limit_s=10, load_weight=0.0)
    for rep in res.layers:
        assert "refine" in dict(rep.stages) and rep.seconds("refine") > 0
    assert evaluate(stats, res.placement, Topology(2, 2), load_weight=0.0).sends == pytest.approx(0.5 * (1 + 7) / 7)


def test_ejection_chain_finds_a_three_cycle_no_swap_finds():
    """Three ranks of one slot; vertex v wants rank v+1 (fetch 0), sits on v (1), and rank v+2
    costs 3: every swap costs 1 more (0 + 3 + 1 = 4 > 3), the 3-cycle saves 3."""
    hg = build_hypergraph(np.array([[0], [1], [2]]), np.ones(3, dtype=np.int64))  # traffic: constant
    w = np.full(3, 2 / 3)
    fetch = np.array([[1.0, 0.0, 3.0], [3.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    start = np.array([0, 1, 2])
    base = hg.objective(start, w, 0.0, fetch)
    for v, u in ((0, 1), (0, 2), (1, 2)):
        swapped = start.copy()
        swapped[[v, u]] = start[[u, v]]
        assert hg.objective(swapped, w, 0.0, fetch) == pytest.approx(base + 1)
    out = fm_refine(hg, start, w, np.ones(3, dtype=np.int64), 0.0, fetch)
    assert out.tolist() == [1, 2, 0]
    assert hg.objective(out, w, 0.0, fetch) == pytest.approx(base - 3)
