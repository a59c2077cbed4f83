"""The ILP pipeline's guarantees: never worse than greedy / local search, a bound for every layer,
and the exact two-rank sub-model of the MIP neighbourhood search (lns.py)."""

import math

import numpy as np
import pytest

from placement.baselines import greedy_layer
from placement.cost import layer_cost
from placement.ilp import default_solver
from placement.lns import apply_split, pair_model, pair_objective, solve_pair_model
from placement.solve import solve_placement
from placement.stats import with_ids_dropped
from placement.topology import Topology


def _check_bounds(res):
    for info in res.layers:
        assert math.isfinite(info.bound), info
        assert info.bound <= info.model_objective + 1e-9
        assert info.bound_kind
    assert math.isfinite(res.bound) and res.bound <= res.model_objective + 1e-9


@pytest.mark.parametrize("ranks,rpn,tl", [(4, 0, 0.05), (4, 0, 1.0), (8, 4, 0.05)])
def test_ilp_never_worse_than_greedy_or_local_search(qwen, ranks, rpn, tl):
    """Goal 1, by construction: also when the budget is too small for any MIP (tl=0.05 per 2
    layers) and with replicas (60 experts on 8 x 8 slots)."""
    stats = qwen.select_layers([0, 4])
    topo = Topology.for_experts(60, ranks, ranks_per_node=rpn)
    res = {m: solve_placement(stats, topo, m, time_limit_s=tl) for m in ("greedy", "local_search", "ilp")}
    ilp = res["ilp"]
    for m in ("greedy", "local_search"):
        assert (ilp.cost.objective_L <= res[m].cost.objective_L + 1e-9).all(), m
    for info, obj in zip(ilp.layers, ilp.cost.objective_L):
        assert info.objective == pytest.approx(obj, abs=1e-9)
        assert info.objective <= info.warm_objective + 1e-12
        # the stage history never rises, and with per-token ids the bound is on the true objective
        objs = [o for _, o in info.stages]
        assert all(b <= a + 1e-12 for a, b in zip(objs, objs[1:])) and objs[-1] == pytest.approx(obj)
        assert info.model == "hypergraph" and info.model_objective == pytest.approx(obj)
    _check_bounds(ilp)  # goal 2: a bound even when the MIP got no time


def test_bound_for_every_layer_hierarchical_and_aggregates(qwen, olmoe_path):
    """Goal 2: aggregates-only statistics use the pairwise model (flat, or hierarchical reporting
    the flat LP relaxation) and get a bound without the neighbourhood search; with per-token ids
    the bound is the exact ILP's, on the true objective."""
    from placement.stats import load_routing
    olmoe = with_ids_dropped(load_routing(olmoe_path))
    topo = Topology.for_experts(64, 8, ranks_per_node=4)
    res = solve_placement(olmoe, topo, "ilp", time_limit_s=2.0, hierarchical=True)
    _check_bounds(res)
    assert res.layers[0].hierarchical and "hierarchical" in res.layers[0].bound_kind
    agg = with_ids_dropped(qwen.select_layers([1]))
    res = solve_placement(agg, Topology(4, 15), "ilp", time_limit_s=1.0)
    _check_bounds(res)
    assert res.layers[0].model == "pairwise" and res.layers[0].lns == (0, 0, 0)


@pytest.mark.parametrize("ranks,rpn", [(4, 0), (8, 4)])  # (8, 4): replicas stay fixed, 2 link costs
def test_pair_model_is_exact(qwen, ranks, rpn):
    """The two-rank sub-model's objective changes equal the exact evaluator's, and its solution
    is never worse than its start."""
    stats = qwen.select_layers([1])
    topo = Topology.for_experts(60, ranks, ranks_per_node=rpn)
    rank_S = np.repeat(np.arange(ranks), topo.slots_per_rank)
    row = greedy_layer(stats.load_LE[0], topo)
    lw = 0.7

    def f(r):
        tr, _, ml, _, _ = layer_cost(stats, 0, r, topo, True)
        return tr + lw * ml

    rng = np.random.default_rng(0)
    fetch = rng.random((60, ranks)) * 0.01
    a, b = 0, ranks - 1
    keep = np.zeros(len(row), dtype=bool)
    keep[np.flatnonzero(rank_S == a)[:3]] = True  # some slots of a held fixed
    pm = pair_model(stats.topk_ids_TLK[:, 0], row, rank_S, a, b, topo.send_weight_R, fetch, lw, keep)
    x0 = np.zeros(len(pm.slots))
    x0[:pm.slots_a] = 1.0
    mig = lambda r: fetch[r[rank_S == a], a].sum() + fetch[r[rank_S == b], b].sum()  # noqa: E731
    for _ in range(6):
        x = rng.permutation(x0)
        new = apply_split(row, pm, x)
        assert sorted(new) == sorted(row)
        assert (f(new) + mig(new)) - (f(row) + mig(row)) == pytest.approx(
            pair_objective(pm, x) - pair_objective(pm, x0), abs=1e-9)
    small = pair_model(stats.topk_ids_TLK[:, 0], row, rank_S, a, b, topo.send_weight_R, fetch, lw,
                       np.isin(np.arange(len(row)), np.flatnonzero(rank_S == a)[5:])
                       | np.isin(np.arange(len(row)), np.flatnonzero(rank_S == b)[5:]))
    xs0 = np.zeros(len(small.slots))
    xs0[:small.slots_a] = 1.0
    xs, status = solve_pair_model(small, xs0, 10.0, default_solver())
    assert status == "optimal" and pair_objective(small, xs) <= pair_objective(small, xs0) + 1e-12
