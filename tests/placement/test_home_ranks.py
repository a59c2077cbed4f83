"""Home ranks: sends scored from each token's own rank (cost model, hypergraph ILP, local search,
LNS), against hand-computed values and brute force over every placement of tiny instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placement import Placement, Topology, evaluate, from_topk_ids, load_routing, solve_placement, split_tokens
from placement.baselines import _SwapState, local_search_layer
from placement.cost import origin_classes
from placement.hyper_ilp import solve_exact, trivial_bound
from placement.hypergraph import build_hypergraph, rank_of_vertices
from placement.lns import apply_split, pair_model, pair_objective
from placement.stats import RoutingStats, StatsError, without_homes

# 5 tokens, one layer, top-2 over 4 experts; contiguous on 2 ranks: {0, 1} | {2, 3}
IDS = np.array([[0, 1], [0, 2], [0, 2], [2, 3], [2, 3]])[:, None, :]
HOME = np.array([0, 0, 1, 0, 1])


def _stats(ids=IDS, home=HOME, E=4):
    return from_topk_ids(ids, E, home_T=home)


def test_sends_from_home_rank_hand_computed():
    s, topo = _stats(), Topology(2, 2)
    p = Placement.contiguous(1, 4, 2)
    # t0 {0,1} home 0: 0; t1 {0,2} home 0: rank 1; t2 {0,2} home 1: rank 0; t3 {2,3} home 0: rank 1;
    # t4 {2,3} home 1: 0  -> 3 sends / 5 tokens
    assert evaluate(s, p, topo).sends == pytest.approx(3 / 5)
    assert evaluate(s, p, topo).traffic == pytest.approx(3 / 5)  # link cost 1 inside a node
    # without home ranks (uniform origin over 2 ranks): need = [3, 4] tokens x 1/2 -> 3.5 / 5
    assert evaluate(without_homes(s), p, topo).sends == pytest.approx(3.5 / 5)
    # two nodes of one rank, inter-node cost 4: every send costs 4
    assert evaluate(s, p, Topology(2, 2, ranks_per_node=1, inter_node_cost=4.0)).traffic == pytest.approx(12 / 5)
    # experts 0, 2 together on rank 0: t1 sends 0, t2 sends 1 (rank 0), t0 and t3 1 each, t4 1
    p2 = Placement(np.array([[0, 2, 1, 3]]), (2, 2), 4)
    assert evaluate(s, p2, topo).sends == pytest.approx(4 / 5)


def test_replica_on_the_home_rank_is_used_as_the_dispatcher_does():
    # 3 ranks x 2 slots: [0, 1 | 2, 0 | 3, 1]; expert 0 on ranks 0 and 1, expert 1 on 0 and 2
    p = Placement(np.array([[0, 1, 2, 0, 3, 1]]), (2, 2, 2), 4)
    ids = np.array([[0, 2], [0, 3], [0, 1], [0, 1]])[:, None, :]
    home = np.array([1, 1, 2, 2])
    # t0 {0,2} home 1: rank 1 holds both -> 0 sends (t mod c would send it to rank 0 for expert 0)
    # t1 {0,3} home 1: expert 0 local, 3 on rank 2 -> 1; t2 {0,1} home 2: 1 local, 0 via replica
    # 2 mod 2 = 0 (slot 0, rank 0) -> 1; t3 the same -> 1: 3 sends / 4 tokens
    cost = evaluate(from_topk_ids(ids, 4, home_T=home), p, Topology(3, 2))
    assert cost.sends == pytest.approx(3 / 4)
    # load: rank 0 computes t2's and t3's expert 0 (2), rank 1 t0's 0 and 2, t1's 0 (3), rank 2 3
    assert cost.max_load_L[0] == pytest.approx(3 / 4)
    from moetrain.parallel.dispatcher import route_table  # the dispatcher's own rule agrees

    dest_RE, _ = route_table(p, 0)
    sends = sum(len({int(dest_RE[o, e]) for e in ids[t, 0]} - {int(o)}) for t, o in enumerate(home))
    assert sends == 3


def test_home_rank_outside_topology_is_an_error():
    with pytest.raises(Exception, match="home rank 2"):
        evaluate(_stats(home=np.array([0, 0, 2, 0, 1])), Placement.contiguous(1, 4, 2), Topology(2, 2))


def test_stats_home_validation_and_file_round_trip(tmp_path):
    with pytest.raises(StatsError, match="home_T has shape"):
        _stats(home=np.array([0, 1]))
    with pytest.raises(StatsError, match="negative"):
        _stats(home=np.array([0, 0, -1, 0, 1]))
    with pytest.raises(StatsError, match="needs per-token topk_ids"):
        RoutingStats(4, 2, np.ones((1, 4)), np.zeros((1, 4, 4)), np.zeros((0, 4, 4)), home_T=np.zeros(3, int))
    s = _stats()
    s.save(tmp_path / "h.npz")
    back = load_routing(tmp_path / "h.npz")
    assert back.home_T.tolist() == HOME.tolist() and back.num_home_ranks == 2
    without_homes(s).save(tmp_path / "old.npz")  # a file without home_rank: today's behaviour
    assert load_routing(tmp_path / "old.npz").home_T is None
    fit, held = split_tokens(s, seed=0, fraction=0.6)
    pairs = {(tuple(i), h) for i, h in zip(IDS[:, 0].tolist(), HOME.tolist())}
    got = {(tuple(i), h) for part in (fit, held) for i, h in zip(part.topk_ids_TLK[:, 0].tolist(), part.home_T.tolist())}
    assert got == pairs and fit.num_tokens + held.num_tokens == 5


def _rows(E: int, slots: int):
    """Every layer row of E experts in slots of ``slots`` per rank (one per set partition order)."""
    seen = set()
    for perm in itertools.permutations(range(E)):
        key = tuple(tuple(sorted(perm[i:i + slots])) for i in range(0, E, slots))
        if key not in seen:
            seen.add(key)
            yield np.array([e for part in key for e in part])


def _tiny(seed: int, T: int = 60, E: int = 6, R: int = 3, K: int = 2):
    """Homes that prefer experts: home r draws from experts {2r, 2r+1} with probability 0.6."""
    rng = np.random.default_rng(seed)
    home = rng.integers(0, R, T)
    ids = np.zeros((T, 1, K), dtype=np.int64)
    for t in range(T):
        pref = [2 * home[t], 2 * home[t] + 1]
        w = np.full(E, 0.4 / (E - 2))
        w[pref] = 0.3
        ids[t, 0] = rng.choice(E, K, replace=False, p=w)
    return from_topk_ids(ids, E, home_T=home)


@pytest.mark.parametrize("topo", [Topology(3, 2), Topology(3, 2, ranks_per_node=1, inter_node_cost=3.0)])
def test_exact_ilp_and_pipeline_match_brute_force(topo):
    s = _tiny(1)
    rank_S = np.repeat(np.arange(3), 2)
    origin_T, w_OR, _ = origin_classes(s, topo)
    hg = build_hypergraph(s.topk_ids_TLK[:, 0], np.ones(6, dtype=np.int64), origin_T, 3)
    best = min(evaluate(s, Placement(r[None], (2, 2, 2), 6), topo, load_weight=0.3).objective for r in _rows(6, 2))
    for row in list(_rows(6, 2))[:10]:  # the hypergraph's objective is evaluate()'s
        want = evaluate(s, Placement(row[None], (2, 2, 2), 6), topo, load_weight=0.3).objective
        assert hg.objective(rank_of_vertices(row, rank_S), w_OR, 0.3) == pytest.approx(want)
    res = solve_exact(hg, w_OR, np.array([2, 2, 2]), 0.3, np.zeros((6, 3)), warm_V=None, time_limit_s=20,
                      max_edges=10**6, solver="cbc")
    assert res.status == "optimal"
    assert hg.objective(res.rank_V, w_OR, 0.3) == pytest.approx(best, abs=1e-6)
    assert res.bound <= best + 1e-6 and trivial_bound(hg, w_OR, 0.3) <= best
    out = solve_placement(s, topo, "ilp", time_limit_s=5, load_weight=0.3, solver="cbc")
    assert out.cost.objective == pytest.approx(best, abs=1e-9)
    # the home-aware optimum co-locates each home's preferred experts on that home
    agnostic = solve_placement(without_homes(s), topo, "ilp", time_limit_s=5, load_weight=0.3, solver="cbc")
    assert evaluate(s, agnostic.placement, topo).sends > out.cost.sends


def test_swap_deltas_with_home_ranks_are_exact():
    s, topo = _tiny(2), Topology(3, 2, ranks_per_node=1, inter_node_cost=2.0)
    row = np.array([0, 2, 4, 1, 3, 5])  # every home's preferred pair split
    fetch = np.zeros((6, 3))
    st = _SwapState(s, 0, topo, row, fetch, 0.5, True)
    d = st.delta_SS()
    for a, b in itertools.combinations(range(6), 2):
        if a // 2 == b // 2:
            continue
        cand = row.copy()
        cand[[a, b]] = cand[[b, a]]
        got = _SwapState(s, 0, topo, cand, fetch, 0.5, True).objective() - st.objective()
        assert d[a, b] == pytest.approx(got, abs=1e-12)
    assert st.objective() == pytest.approx(evaluate(s, Placement(row[None], (2, 2, 2), 6), topo, load_weight=0.5).objective)
    ls = local_search_layer(s, 0, topo, row, load_weight=0.5)
    assert evaluate(s, Placement(ls[None], (2, 2, 2), 6), topo, load_weight=0.5).objective < st.objective() - 0.1


def test_lns_pair_model_with_home_ranks_is_exact():
    s, topo = _tiny(3), Topology(3, 2)
    rank_S = np.repeat(np.arange(3), 2)
    origin_T, w_OR, _ = origin_classes(s, topo)
    row = np.array([0, 3, 1, 4, 2, 5])
    def obj(r):
        return evaluate(s, Placement(r[None], (2, 2, 2), 6), topo, load_weight=0.7).objective
    pm = pair_model(s.topk_ids_TLK[:, 0], row, rank_S, 0, 1, w_OR, np.zeros((6, 3)), 0.7, origin_T=origin_T)
    x0 = np.array([1.0, 1.0, 0.0, 0.0])
    for x in itertools.product([0.0, 1.0], repeat=4):
        x = np.array(x)
        if x.sum() != 2:
            continue
        want = obj(apply_split(row, pm, x)) - obj(row)
        assert pair_objective(pm, x) - pair_objective(pm, x0) == pytest.approx(want, abs=1e-12)
