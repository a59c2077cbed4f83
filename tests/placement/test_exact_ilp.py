"""The exact hypergraph model: its objective is evaluate()'s, its ILP optimum is brute force's,
its bound stays valid under the hyperedge cap, and solves are deterministic for a seed."""

import itertools

import numpy as np
import pytest

from placement.baselines import greedy_layer, replica_counts
from placement.cost import evaluate, holders_ER
from placement.hyper_ilp import build_exact, canonical_ranks, solve_exact, warm_values
from placement.hypergraph import build_hypergraph, rank_of_vertices, row_from_ranks
from placement.ilp import HAVE_HIGHS
from placement.placement import Placement
from placement.phases import perturb
from placement.solve import solve_placement
from placement.stats import from_topk_ids
from placement.topology import Topology

SOLVERS = ["cbc"] + (["highs"] if HAVE_HIGHS else [])


def test_hypergraph_by_hand():
    ids = np.array([[0, 1, 2], [2, 1, 0], [0, 3, -1], [2, -1, -1], [-1, -1, -1]])
    hg = build_hypergraph(ids, np.ones(4, dtype=np.int64))
    assert hg.weight_H.tolist() == [2.0, 1.0]  # {0,1,2} twice, then {0,3}; heaviest first
    assert hg.edge_pins.tolist() == [0, 1, 2, 0, 3] and hg.edge_ptr.tolist() == [0, 3, 5]
    assert hg.single_V.tolist() == [0, 0, 1, 0] and hg.load_V.tolist() == [3, 2, 3, 1]
    rank_V = np.array([0, 0, 1, 1])  # rank 0 {0, 1}, rank 1 {2, 3}
    assert hg.km1(rank_V, 2) == 2 * 1 + 1 * 1
    topo = Topology(2, 2)
    stats = from_topk_ids(ids[:, None, :], 4)
    p = Placement(np.array([[0, 1, 2, 3]]), (2, 2), 4)
    # 4 tokens hold an id (the all -1 row is not the layer's: cost.layer_tokens): sends =
    # (1 - 1/2) x (2 x 2 + 2 + 1) / 4, load max 5 (rank 1: 3 + 1 ... rank 0: 3 + 2)
    assert hg.num_tokens == 4
    assert hg.objective(rank_V, topo.send_weight_R, 0.5) == pytest.approx(0.5 * 7 / 4 + 0.5 * 5 / 4)
    assert evaluate(stats, p, topo, load_weight=0.5).objective == pytest.approx(0.5 * 7 / 4 + 0.5 * 5 / 4)
    # expert 0 with two replicas: tokens 0, 2, 4 use replica 0, tokens 1, 3 replica 1
    hg2 = build_hypergraph(ids, np.array([2, 1, 1, 1]))
    assert hg2.expert_V.tolist() == [0, 0, 1, 2, 3] and hg2.replica_V.tolist() == [0, 1, 0, 0, 0]
    assert hg2.load_V.tolist() == [2, 1, 2, 3, 1]


@pytest.mark.parametrize("ranks,rpn", [(4, 0), (8, 4)])  # (8, 4): 4 replicas, two link costs
def test_exact_objective_equals_evaluate(qwen, ranks, rpn):
    stats = qwen.select_layers([3])
    topo = Topology.for_experts(60, ranks, ranks_per_node=rpn)
    srank = np.repeat(np.arange(ranks), topo.slots_per_rank)
    row0 = greedy_layer(stats.load_LE[0], topo)
    cnt = np.bincount(row0, minlength=60)
    hg = build_hypergraph(stats.topk_ids_TLK[:, 0], cnt)
    cur = Placement(perturb(row0, topo, np.random.default_rng(9), 30)[None], topo.slots_per_rank, 60)
    fetch_VR = ((holders_ER(cur.phy2log_LS[0], srank, 60, ranks) == 0) * 0.3 * 2.0)[hg.expert_V]
    rng = np.random.default_rng(0)
    for _ in range(4):
        row = perturb(row0, topo, rng, 20)
        rank_V = rank_of_vertices(row, srank)
        want = evaluate(stats, Placement(row[None], topo.slots_per_rank, 60), topo, current=cur, load_weight=0.8,
                        migration_weight=0.3, expert_bytes=2.0).objective
        assert hg.objective(rank_V, topo.send_weight_R, 0.8, fetch_VR) == pytest.approx(want, abs=1e-9)
        m = build_exact(hg, topo.send_weight_R, np.array(topo.slots_per_rank), 0.8, fetch_VR, 10**9)
        vals = warm_values(m, hg, canonical_ranks(m, hg.load_V, rank_V))
        assert m.cost @ vals == pytest.approx(want, abs=1e-9)  # the ILP's coefficients are evaluate()'s
        assert sorted(row_from_ranks(rank_V, hg.expert_V, np.array(topo.slots_per_rank))) == sorted(row)


def _toy(seed, E, T=90, k=3):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, 0.8))
    return from_topk_ids(np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(T)])[:, None, :], E)


def _brute(stats, topo, lw):
    """min over every row with greedy's replica counts (replicas on distinct ranks)."""
    cnt = replica_counts(stats.load_LE[0], topo)
    srank = np.repeat(np.arange(topo.num_ranks), topo.slots_per_rank)
    best = np.inf
    for row in set(itertools.permutations(np.repeat(np.arange(stats.num_experts), cnt))):
        row = np.array(row)
        if len(set(zip(row, srank))) < len(row) or any(
                len(set(srank[row == e])) < c for e, c in enumerate(cnt)):
            continue
        best = min(best, evaluate(stats, Placement(row[None], topo.slots_per_rank, stats.num_experts), topo,
                                  load_weight=lw).objective)
    return best, cnt


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("E,ranks,slots", [(6, 3, 2), (5, 3, 2)])  # (5, 3, 2): one replica
def test_exact_ilp_equals_brute_force(solver, E, ranks, slots):
    """Top-3 tokens (the pairwise model is not exact there): ILP optimum == brute force; with the
    hyperedge cap the bound stays below the optimum."""
    stats = _toy(E, E)
    topo = Topology(ranks, slots)
    lw = 0.6
    best, cnt = _brute(stats, topo, lw)
    hg = build_hypergraph(stats.topk_ids_TLK[:, 0], cnt)
    zero = np.zeros((hg.num_vertices, ranks))
    args = (hg, topo.send_weight_R, np.array(topo.slots_per_rank), lw, zero)
    res = solve_exact(*args, warm_V=None, time_limit_s=30, max_edges=10**6, solver=solver)
    assert res.status == "optimal"
    assert hg.objective(res.rank_V, topo.send_weight_R, lw) == pytest.approx(best, abs=1e-6)
    assert best - 1e-3 * best <= res.bound <= best + 1e-9
    capped = solve_exact(*args, warm_V=None, time_limit_s=30, max_edges=3, solver=solver)
    assert capped.bound <= best + 1e-9
    assert hg.objective(capped.rank_V, topo.send_weight_R, lw) >= best - 1e-9


def test_same_seed_same_placement():
    """Count-bounded phases and seeded choices: identical solves give the identical placement."""
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.full(12, 0.6))
    ids = np.stack([np.stack([rng.choice(12, 3, replace=False, p=p) for _ in range(150)]) for _ in range(2)], 1)
    stats = from_topk_ids(ids, 12)
    topo = Topology(3, 4)
    runs = [solve_placement(stats, topo, "ilp", time_limit_s=20, seed=7, restarts=3) for _ in range(2)]
    assert runs[0].placement == runs[1].placement
    assert all(not r.capped for r in runs[0].layers), [r.capped for r in runs[0].layers]
    other = solve_placement(stats, topo, "ilp", time_limit_s=20, seed=8, restarts=3)
    assert other.cost.objective <= solve_placement(stats, topo, "local_search").cost.objective + 1e-12
