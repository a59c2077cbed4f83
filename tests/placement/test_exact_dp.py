"""placement/exact.py: the dynamic programme's optimum against hand counts and brute force."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from placement.cost import evaluate
from placement.exact import check_exact, dp_work, exact_layer, exact_placement
from placement.placement import Placement, PlacementError
from placement.stats import from_aggregates, from_topk_ids
from placement.topology import Topology


def brute_force(stats, topo, objective, cap):
    """Best value over every single-replica placement (evaluate()'s figures)."""
    R = topo.num_ranks
    best = np.inf
    for perm in set(itertools.permutations(np.repeat(np.arange(R), topo.slots_per_rank))):
        c = evaluate(stats, Placement.from_expert_rank(np.array(perm)[None], R), topo, load_weight=0.0)
        if cap is not None and c.imbalance_L[0] > cap + 1e-9:
            continue
        best = min(best, c.sends_L[0] if objective == "sends" else c.traffic_L[0])
    return best


def random_stats(E, R, T, seed, homes):
    rng = np.random.default_rng(seed)
    # skewed routing: a few experts popular, pairs correlated
    p = rng.dirichlet(np.full(E, 0.7))
    ids = np.stack([rng.choice(E, 2, replace=False, p=p) for _ in range(T)])[:, None, :]
    st = from_topk_ids(ids, E)
    return dataclasses.replace(st, home_T=rng.integers(0, R, T)) if homes else st


def test_hand_counted_homes():
    # 4 experts, 2 ranks x 2 slots. Tokens (experts; home): {0,1};0 x3, {2,3};1 x2, {0,2};1 x1.
    ids = np.array([[0, 1]] * 3 + [[2, 3]] * 2 + [[0, 2]])[:, None, :]
    st = dataclasses.replace(from_topk_ids(ids, 4), home_T=np.array([0, 0, 0, 1, 1, 1]))
    pl, (layer,) = exact_placement(st, Topology.uniform(2, 2))
    # {0,1} on rank 0 and {2,3} on rank 1: only the last token sends (expert 0 on rank 0): 1 / 6
    assert layer.cost == pytest.approx(1 / 6)
    assert layer.rank_E.tolist() == [0, 0, 1, 1]
    assert evaluate(st, pl, Topology.uniform(2, 2)).sends_L[0] == pytest.approx(1 / 6)
    # rank loads: rank 0 has 3*2 + 1 = 7 pairs, rank 1 has 2*2 + 1 = 5; per token 7/6, mean 1
    assert layer.max_load == pytest.approx(7 / 6) and layer.mean_load == pytest.approx(1.0)
    # a cap of 1.1 x mean forbids 7/6: the best balanced split is {0,2} | {1,3}:
    # loads (4+2)/6 = 1 each; sends: {0,1};0 -> 1 each (3), {2,3};1 -> 1 each (2), {0,2};1 -> 1: 6/6
    _, (capped,) = exact_placement(st, Topology.uniform(2, 2), balance_cap=1.1)
    assert capped.cost == pytest.approx(1.0)
    assert capped.max_load == pytest.approx(1.0)


@pytest.mark.parametrize("homes", [False, True])
@pytest.mark.parametrize("topo", [Topology.uniform(3, 2), Topology.uniform(3, (3, 2, 1)),
                                  Topology.uniform(3, 2, ranks_per_node=1, inter_node_cost=3.0)],
                         ids=["even", "uneven", "3-nodes"])
@pytest.mark.parametrize("objective", ["sends", "traffic"])
@pytest.mark.parametrize("cap", [None, 1.15])
def test_equals_brute_force(homes, topo, objective, cap):
    st = random_stats(6, 3, 300, seed=7, homes=homes)
    best = brute_force(st, topo, objective, cap)
    pl, (layer,) = exact_placement(st, topo, objective=objective, balance_cap=cap)
    if not np.isfinite(best):
        assert pl is None and layer.cost == np.inf
        return
    assert layer.cost == pytest.approx(best, abs=1e-12)
    got = evaluate(st, pl, topo, load_weight=0.0)
    assert (got.sends_L[0] if objective == "sends" else got.traffic_L[0]) == pytest.approx(best, abs=1e-12)
    if cap is not None:
        assert got.imbalance_L[0] <= cap + 1e-9


def test_beats_or_ties_every_other_placement_16_experts():
    # the benchmark's size: 16 experts on 4 ranks, home ranks; no sampled placement is better
    st = random_stats(16, 4, 4000, seed=3, homes=True)
    topo = Topology.uniform(4, 4)
    pl, (layer,) = exact_placement(st, topo, balance_cap=1.2)
    assert evaluate(st, pl, topo).sends_L[0] == pytest.approx(layer.cost)
    rng = np.random.default_rng(0)
    for _ in range(300):
        c = evaluate(st, Placement.random(1, 16, 4, seed=int(rng.integers(1 << 30))), topo)
        if c.imbalance_L[0] <= 1.2:
            assert c.sends_L[0] >= layer.cost - 1e-12
    assert layer.work == dp_work(16, (4, 4, 4, 4)) == 1820 + 1820 * 495 + 12870 * 70 + 1820


def test_layers_solved_separately():
    # layer 1 is layer 0 with experts renamed: its optimum is the renamed placement, same cost
    st0 = random_stats(6, 2, 200, seed=1, homes=True)
    perm = np.array([3, 5, 0, 1, 4, 2])
    ids = np.concatenate([st0.topk_ids_TLK, perm[st0.topk_ids_TLK]], axis=1)
    st = dataclasses.replace(from_topk_ids(ids, 6), home_T=st0.home_T)
    pl, layers = exact_placement(st, Topology.uniform(2, 3))
    assert layers[0].cost == pytest.approx(layers[1].cost)
    assert pl.num_layers == 2
    assert (layers[1].rank_E[perm] == layers[0].rank_E).all()


def test_refusals_name_the_problem():
    st = random_stats(6, 3, 50, seed=0, homes=False)
    with pytest.raises(PlacementError, match="one slot per expert"):
        exact_placement(st, Topology.uniform(3, 3))  # 9 slots: replicas
    with pytest.raises(PlacementError, match="set scores per layer"):
        check_exact(22, Topology.uniform(4, (6, 6, 5, 5)))
    with pytest.raises(PlacementError, match="at most 22 experts"):
        check_exact(32, Topology.uniform(32, 1))
    with pytest.raises(PlacementError, match="per-token expert ids"):
        exact_placement(from_aggregates(np.ones((1, 6)), np.zeros((1, 6, 6)), 2), Topology.uniform(3, 2))
    with pytest.raises(PlacementError, match="balance_cap"):
        exact_placement(st, Topology.uniform(3, 2), balance_cap=0.9)
    with pytest.raises(PlacementError, match="objective"):
        exact_placement(st, Topology.uniform(3, 2), objective="load")


def test_exact_layer_ignores_dropped_slots():
    # -1 ids (a token with fewer experts) are no expert: a token with only -1 costs nothing
    ids = np.array([[0, -1], [-1, -1], [1, 2]])
    layer = exact_layer(ids, 3, Topology.uniform(3, 1), np.ones((1, 3)) - 0.0)
    # one class, weight 1 for every rank: token 0 reaches 1 rank, token 2 two ranks: 3 sends over
    # the 2 tokens holding an id in the layer (cost.layer_tokens: a row of -1 is not the layer's)
    assert layer.cost == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------------
# The ILP pipeline's exact phase (solve.py)
# ---------------------------------------------------------------------------------------------


def full_objective_brute_force(stats, topo, load_weight, current=None, migration_weight=0.0, cap=None):
    R = topo.num_ranks
    best = np.inf
    for perm in set(itertools.permutations(np.repeat(np.arange(R), topo.slots_per_rank))):
        c = evaluate(stats, Placement.from_expert_rank(np.array(perm)[None], R), topo, load_weight=load_weight,
                     current=current, migration_weight=migration_weight)
        if cap is None or c.imbalance_L[0] <= cap + 1e-9:
            best = min(best, c.objective)
    return best


@pytest.mark.parametrize("homes", [False, True])
@pytest.mark.parametrize("load_weight", [0.0, 0.5, 4.0])
def test_pipeline_exact_phase_is_the_optimum(homes, load_weight):
    from placement.solve import solve_placement

    st = random_stats(6, 3, 300, seed=11, homes=homes)
    topo = Topology.uniform(3, 2)
    res = solve_placement(st, topo, "ilp", time_limit_s=5, load_weight=load_weight)
    (rep,) = res.layers
    assert rep.model == "set_partition" and rep.status == "optimal" and res.status == "optimal"
    assert rep.bound == rep.objective == pytest.approx(res.cost.objective)
    assert res.cost.objective == pytest.approx(full_objective_brute_force(st, topo, load_weight), abs=1e-12)
    assert "exact_dp" in dict(rep.stages) and "tabu" not in dict(rep.stages)  # nothing left to search


def test_pipeline_exact_phase_with_migration_and_cap():
    from placement.solve import solve_placement

    st = random_stats(6, 3, 300, seed=5, homes=True)
    topo = Topology.uniform(3, 2)
    cur = Placement.from_expert_rank(np.array([[2, 2, 1, 1, 0, 0]]), 3)
    for mw in (0.0, 0.05, 1.0):
        res = solve_placement(st, topo, "ilp", current=cur, time_limit_s=5, load_weight=1.0, migration_weight=mw)
        assert res.cost.objective == pytest.approx(full_objective_brute_force(st, topo, 1.0, cur, mw), abs=1e-12)
    # a migration weight of 1 per expert outweighs any traffic saving (< 2 per token): stay put
    assert res.placement == cur
    # a hard cap a little above the best balance any placement reaches (this routing is skewed)
    imb = [evaluate(st, Placement.from_expert_rank(np.array(p)[None], 3), topo).imbalance_L[0]
           for p in set(itertools.permutations([0, 0, 1, 1, 2, 2]))]
    cap = min(imb) + 0.02
    free = solve_placement(st, topo, "ilp", time_limit_s=5, load_weight=0.0)
    assert free.cost.imbalance_L[0] > cap  # the cap binds
    res = solve_placement(st, topo, "ilp", time_limit_s=5, load_weight=0.0, balance_cap=cap)
    assert res.cost.imbalance_L[0] <= cap + 1e-9
    assert res.cost.objective == pytest.approx(full_objective_brute_force(st, topo, 0.0, cap=cap), abs=1e-12)


def test_pipeline_exact_phase_beats_the_search_at_16_experts(monkeypatch):
    """The benchmark's size: the exact phase's answer is never worse than the search pipeline's,
    and it is proven; with it switched off the pipeline reports no optimum."""
    from placement import phases, solve

    st = random_stats(16, 4, 3000, seed=2, homes=True)
    topo = Topology.uniform(4, 4)
    exact = solve.solve_placement(st, topo, "ilp", time_limit_s=60, load_weight=4.0, seed=1)  # a cap: the DP takes < 1 s
    assert all(r.model == "set_partition" for r in exact.layers) and exact.gap == 0.0
    monkeypatch.setattr(phases, "MAX_WORK", 0)
    search = solve.solve_placement(st, topo, "ilp", time_limit_s=3, load_weight=4.0, seed=1)
    assert all(r.model == "hypergraph" for r in search.layers)
    assert exact.cost.objective <= search.cost.objective + 1e-12


def test_pareto_walk_stops_at_the_deadline():
    from placement.exact import LayerTables, exact_layer_with_load

    st = random_stats(8, 2, 500, seed=4, homes=True)
    topo = Topology.uniform(2, 4)
    from placement.cost import origin_classes

    o, w, _ = origin_classes(st, topo)
    tables = LayerTables(st.topk_ids_TLK[:, 0], 8, topo, w, o)
    full = exact_layer_with_load(tables, 10.0)
    assert full.complete and full.solves >= 2
    cut = exact_layer_with_load(tables, 10.0, deadline=0.0)  # past: one solve, then stop
    assert not cut.complete and cut.solves == 1 and cut.objective >= full.objective
    assert full.objective == pytest.approx(full_objective_brute_force(st, topo, 10.0), abs=1e-12)


def test_search_path_honours_the_balance_cap(monkeypatch):
    """Without the exact phase the heuristics' rows ignore the cap; the MIP's row within it must
    still win over a lower-objective row above it."""
    from placement import phases, solve

    monkeypatch.setattr(phases, "MAX_WORK", 0)
    st = random_stats(6, 3, 300, seed=5, homes=True)
    topo = Topology.uniform(3, 2)
    imb = [evaluate(st, Placement.from_expert_rank(np.array(p)[None], 3), topo).imbalance_L[0]
           for p in set(itertools.permutations([0, 0, 1, 1, 2, 2]))]
    cap = min(imb) + 0.02
    free = solve.solve_placement(st, topo, "ilp", time_limit_s=4, load_weight=0.0)
    assert free.cost.imbalance_L[0] > cap
    res = solve.solve_placement(st, topo, "ilp", time_limit_s=4, load_weight=0.0, balance_cap=cap)
    assert res.layers[0].model == "hypergraph"
    assert res.cost.imbalance_L[0] <= cap + 1e-9
    assert res.cost.objective == pytest.approx(full_objective_brute_force(st, topo, 0.0, cap=cap), abs=1e-12)
