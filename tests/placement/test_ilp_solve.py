"""The ILP against brute force, solution validity, bounds, warm start, time limit, methods."""

import itertools
import pickle
import time

import numpy as np
import pytest

from placement.cost import evaluate, holders_ER
from placement.ilp import HAVE_HIGHS, LayerModel, model_objective, solve_layer_model, top_pairs
from placement.placement import Placement, PlacementError
from placement.solve import METHODS, solve_placement
from placement.stats import from_topk_ids
from placement.topology import Topology

SOLVERS = ["cbc"] + (["highs"] if HAVE_HIGHS else [])


def _toy_stats(seed: int, E: int = 6, k: int = 2, T: int = 120):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, 0.7))  # skewed load
    ids = np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(T)])[:, None, :]
    return from_topk_ids(ids, E)


def _all_placements(E: int, topo: Topology):
    """Every assignment of E experts to ranks with exactly slots_per_rank each (no replicas)."""
    for ranks in itertools.product(range(topo.num_ranks), repeat=E):
        if np.array_equal(np.bincount(ranks, minlength=topo.num_ranks), topo.slots_per_rank):
            yield Placement.from_expert_rank(np.array([ranks]), topo.num_ranks)


def _full_model(stats, topo, load_weight):
    E = stats.num_experts
    cnt = np.ones(E, dtype=np.int64)
    T = stats.num_tokens
    pairs, q = top_pairs(stats.coact_LEE[0], cnt, E * E)
    return LayerModel(stats.load_LE[0] / T, cnt, pairs, q / T, topo.send_weight_R,
                      np.array(topo.slots_per_rank), np.zeros((E, topo.num_ranks)), load_weight, None)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed,ranks,rpn", [(0, 2, 0), (1, 3, 0), (2, 3, 1)])
def test_ilp_optimum_equals_brute_force(solver, seed, ranks, rpn):
    """Top-2 tokens: the pairwise model is exact, so ILP optimum == min over all placements."""
    stats = _toy_stats(seed)
    topo = Topology(ranks, 6 // ranks, ranks_per_node=rpn)
    lw = 0.7
    brute = min(evaluate(stats, p, topo, load_weight=lw).objective for p in _all_placements(6, topo))
    m = _full_model(stats, topo, lw)
    res = solve_layer_model(m, time_limit_s=20, solver=solver)
    assert res.status == "optimal"
    assert res.objective == pytest.approx(brute, abs=1e-6)
    assert res.bound <= res.objective + 1e-9
    assert res.bound == pytest.approx(brute, rel=1e-3)
    hold = np.zeros((6, ranks))
    for e, rs in enumerate(res.rank_sets):
        hold[e, rs] = 1
    assert model_objective(m, hold) == pytest.approx(res.objective, abs=1e-6)


def test_solve_placement_ilp_matches_brute_force_small():
    stats = _toy_stats(5)
    topo = Topology(2, 3)
    best = min(evaluate(stats, p, topo).objective for p in _all_placements(6, topo))
    res = solve_placement(stats, topo, "ilp", time_limit_s=5)
    assert res.cost.objective == pytest.approx(best, abs=1e-9)
    assert res.bound <= res.model_objective + 1e-9


def _check_valid(p: Placement, topo: Topology, E: int, distinct_ranks: bool = True):
    assert p.slots_per_rank == topo.slots_per_rank
    for l in range(p.num_layers):
        assert set(p.phy2log_LS[l].tolist()) == set(range(E))  # every expert at least once
        for r in range(topo.num_ranks if distinct_ranks else 0):
            local = p.local_experts(l, r)
            assert len(set(local.tolist())) == len(local)  # no two replicas on one rank


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("slots", [2, 3])  # 2: no replicas (8 experts / 4 ranks); 3: 4 replicas
def test_every_method_respects_slots_and_replicas(method, slots):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 2, replace=False, p=np.linspace(3, 1, 8) / 16) for _ in range(150)])
    stats = from_topk_ids(np.stack([ids, ids[::-1]], axis=1), 8)
    topo = Topology(4, slots, ranks_per_node=2)
    res = solve_placement(stats, topo, method, time_limit_s=2)
    # Placement.round_robin / contiguous (placement.py) may put two replicas on one rank
    _check_valid(res.placement, topo, 8, distinct_ranks=method not in ("contiguous", "round_robin"))
    if slots == 3 and method in ("greedy", "ilp"):
        hot = int(np.argmax(stats.load_LE[0]))
        assert res.placement.logcnt_LE[0, hot] >= 2  # the hottest expert got a replica
    assert res.cost.objective == pytest.approx(evaluate(stats, res.placement, topo).objective)


def test_ilp_no_worse_than_baselines_and_bound_below(qwen):
    stats = qwen.select_layers([0])
    topo = Topology(4, 15)
    res = {m: solve_placement(stats, topo, m, time_limit_s=3) for m in ("greedy", "local_search", "ilp")}
    ilp = res["ilp"]
    assert ilp.cost.objective <= res["local_search"].cost.objective + 1e-9
    assert ilp.cost.objective <= res["greedy"].cost.objective + 1e-9
    assert ilp.bound <= ilp.model_objective + 1e-9 and np.isfinite(ilp.bound)
    assert ilp.solver in ("highs", "cbc") and ilp.status in ("optimal", "feasible")
    contiguous = solve_placement(stats, topo, "contiguous").cost
    assert ilp.cost.sends < 0.9 * contiguous.sends


def test_time_limit_honoured(qwen):
    """``time_limit_s`` bounds every phase but the convergent local search (solve.py docstring)."""
    t0 = time.monotonic()
    res = solve_placement(qwen, Topology(4, 15), "ilp", time_limit_s=3.0)
    wall = time.monotonic() - t0
    capped = sum(r.seconds("search") + r.seconds("mip") + r.seconds("lns") for r in res.layers)
    extra = sum(r.seconds("heuristics") for r in res.layers)
    assert capped <= 3.0 + 1.0, capped  # slack: model building and hand-over outside the solvers' clocks
    assert wall <= 3.0 + extra + 1.5, (wall, extra)
    assert res.solve_time_s <= wall


def test_warm_start_from_current_honoured(qwen):
    stats = qwen.select_layers([1])
    topo = Topology(4, 15)
    current = solve_placement(stats, topo, "local_search", time_limit_s=1).placement
    kw = dict(current=current, migration_weight=0.05, expert_bytes=1.0)
    res = solve_placement(stats, topo, "ilp", time_limit_s=1.5, **kw)
    base = evaluate(stats, current, topo, **kw)
    assert base.migration == 0
    assert res.cost.objective <= base.objective + 1e-9


def test_warm_start_given_to_the_solver():
    """A MIP start that is already optimal is returned as is with a tiny time limit."""
    stats = _toy_stats(3)
    topo = Topology(2, 3)
    m = _full_model(stats, topo, 1.0)
    best = min(_all_placements(6, topo), key=lambda p: evaluate(stats, p, topo).objective)
    hold = holders_ER(best.phy2log_LS[0], best.slot_rank_S, 6, 2)
    for solver in SOLVERS:
        res = solve_layer_model(m, warm_ER=hold, time_limit_s=5, solver=solver)
        assert res.objective == pytest.approx(model_objective(m, hold), abs=1e-6)


def test_result_is_picklable_and_errors_are_typed(qwen):
    stats = qwen.select_layers([0])
    res = solve_placement(stats, Topology(4, 15), "greedy")
    back = pickle.loads(pickle.dumps(res))
    assert back.placement == res.placement and back.cost.objective == res.cost.objective
    with pytest.raises(PlacementError, match="method"):
        solve_placement(stats, Topology(4, 15), "magic")
    with pytest.raises(PlacementError, match="time_limit_s"):
        solve_placement(stats, Topology(4, 15), "ilp", time_limit_s=0)
    with pytest.raises(ValueError, match="cannot hold"):
        solve_placement(stats, Topology(4, 14), "greedy")


@pytest.mark.parametrize("exact", [True, False])
def test_local_search_swap_deltas_match_the_cost_model(qwen, exact):
    """The incremental swap deltas equal evaluate()'s change (exact, and pairwise model)."""
    from placement.baselines import _SwapState
    from placement.stats import with_ids_dropped
    stats = qwen.select_layers([2])
    stats = stats if exact else with_ids_dropped(stats)
    topo = Topology(4, 15, ranks_per_node=2)
    p = Placement.random(1, 60, 4, seed=1)
    cur = Placement.random(1, 60, 4, seed=2)
    kw = dict(current=cur, load_weight=0.8, migration_weight=0.3, expert_bytes=2.0)
    fetch = (holders_ER(cur.phy2log_LS[0], cur.slot_rank_S, 60, 4) == 0) * 0.6
    d = _SwapState(stats, 0, topo, p.phy2log_LS[0].copy(), fetch, 0.8, exact).delta_SS()
    base = evaluate(stats, p, topo, **kw).objective
    rng = np.random.default_rng(0)
    checked = 0
    for s, u in rng.integers(0, 60, size=(40, 2)):
        if p.slot_rank_S[s] == p.slot_rank_S[u]:
            continue
        row = p.phy2log_LS[0].copy()
        row[s], row[u] = row[u], row[s]
        new = evaluate(stats, Placement(row[None], p.slots_per_rank, 60), topo, **kw).objective
        assert new - base == pytest.approx(d[s, u], abs=1e-9)
        checked += 1
    assert checked > 10


def test_swap_state_in_place_update_equals_rebuild(qwen):
    """The tabu search's in-place exchange keeps the state (objective, every swap delta) equal to
    one rebuilt from the new row."""
    from placement.baselines import _SwapState
    topo = Topology(4, 15, ranks_per_node=2)
    rng = np.random.default_rng(0)
    row = Placement.random(1, 60, 4, seed=3).phy2log_LS[0].copy()
    fetch = rng.random((60, 4)) * 0.01
    state = _SwapState(qwen, 1, topo, row, fetch, 0.7, True)
    for s, u in [(0, 59), (3, 20), (0, 16), (44, 2)]:
        state.swap(s, u)
        row[s], row[u] = row[u], row[s]
        fresh = _SwapState(qwen, 1, topo, row, fetch, 0.7, True)
        assert np.array_equal(state.row_S, row)
        assert state.objective() == pytest.approx(fresh.objective(), abs=1e-12)
        assert np.allclose(state.delta_SS(), fresh.delta_SS())


def test_swap_deltas_pair_list_equal_dense(qwen, monkeypatch):
    """The sparse (token, slot, slot) pair count and the dense product give the same swap deltas,
    before and after in-place exchanges."""
    from placement import baselines
    topo = Topology(4, 15)
    row = Placement.random(1, 60, 4, seed=5).phy2log_LS[0].copy()
    fetch = np.random.default_rng(1).random((60, 4)) * 0.01
    sparse = baselines._SwapState(qwen, 2, topo, row, fetch, 0.3, True)
    monkeypatch.setattr(baselines, "PAIR_DENSITY_MAX", 0.0)
    dense = baselines._SwapState(qwen, 2, topo, row, fetch, 0.3, True)
    assert sparse.pairs is not None and dense.pairs is None
    for s, u in [(None, None), (1, 30), (14, 59), (1, 45)]:
        if s is not None:
            sparse.swap(s, u)
            dense.swap(s, u)
        assert np.allclose(sparse.delta_SS(), dense.delta_SS(), atol=1e-12)


def test_layer_deadline_shares_the_time_left_equally():
    from placement.methods import layer_deadline as _layer_deadline
    now = time.monotonic()
    # 10 s left, 5 layers to go: 2 s each; the last layer gets all that is left
    assert _layer_deadline(now + 10.0, 0, 5) - now == pytest.approx(2.0, abs=0.05)
    assert _layer_deadline(now + 10.0, 4, 5) - now == pytest.approx(10.0, abs=0.05)
    # layer 3 of 5 after an earlier layer overran: it still gets half of what is left, not 0
    assert _layer_deadline(now + 3.0, 3, 5) - now == pytest.approx(1.5, abs=0.05)
    # past the end: no time (the deadline is now)
    assert _layer_deadline(now - 1.0, 2, 5) <= time.monotonic()
