"""Fault-domain-aware placement (placement/domains.py): every expert on two fault domains where the
slots allow, spare slots to the hottest experts first, the single-homed experts reported exactly,
every solver path keeping the rule, and ``fault_domain="none"`` exactly the placement of before."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placement import Placement, Topology, evaluate, from_topk_ids, solve_placement
from placement.baselines import greedy_layer, local_search_layer, replica_counts, tabu_search_layer
from placement.domains import FaultDomains, domain_vector, max_multi_homed, single_homed
from placement.hyper_ilp import solve_exact
from placement.hypergraph import build_hypergraph, rank_of_vertices, row_from_ranks
from placement.ilp import LayerModel, model_objective, solve_layer_model, top_pairs
from placement.cost import holders_ER
from placement.phases import perturb
from placement.placement import PlacementError
from placement.refine import fm_refine
from placement.stats import with_ids_dropped

LOAD = np.array([40.0, 30.0, 20.0, 10.0])  # expert 0 the hottest
PATHS = ["greedy", "local_search", "ilp", "validated"]  # the searches: the hottest are the multi-homed
METHODS = PATHS + ["contiguous", "round_robin"]


def _stats(load=LOAD, L: int = 2):
    """Top-1 tokens: expert e chosen ``load[e]`` times in every layer (its load, exactly)."""
    ids = np.repeat(np.arange(len(load)), np.asarray(load, dtype=int))[:, None]
    return from_topk_ids(np.stack([ids] * L, axis=1), len(load))


def _two_nodes(slots) -> Topology:
    return Topology(4, slots, ranks_per_node=2)


# ---- what the slots allow, by hand ------------------------------------------------------------


def test_what_the_slots_allow():
    nodes = np.array([0, 0, 1, 1])
    assert max_multi_homed((2, 2, 2, 2), nodes, 4) == 4  # 8 slots, 2 nodes: every expert twice
    assert max_multi_homed((3, 2, 2, 2), nodes, 4) == 4
    assert max_multi_homed((2, 1, 2, 1), nodes, 4) == 2  # 2 spare slots: 2 experts
    assert max_multi_homed((2, 1, 1, 1), nodes, 4) == 1
    assert max_multi_homed((1, 1, 1, 1), nodes, 4) == 0  # no spare slot
    assert max_multi_homed((2, 2, 2, 2), np.zeros(4, dtype=int), 4) == 0  # one domain
    # node 1 holds 2 slots: each multi-homed expert needs one of them
    assert max_multi_homed((3, 3, 1, 1), nodes, 4) == 2
    assert max_multi_homed((2, 2, 2, 2), np.arange(4), 4) == 4  # rank domains


def test_domain_vector_of_each_kind():
    topo = Topology.from_nodes((0, 0, 1, 1, 1), 2)
    assert domain_vector(topo, "none") is None
    assert domain_vector(topo, "node").tolist() == [0, 0, 1, 1, 1]
    assert domain_vector(topo, "rank").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(PlacementError, match=r"fault_domain \('rack'\) must be one of none, node, rank"):
        domain_vector(topo, "rack")
    with pytest.raises(PlacementError, match="fault_domain"):
        solve_placement(_stats(), _two_nodes(2), "greedy", fault_domain="rack")


# ---- hand-computed cases: 4 experts, 4 ranks on 2 nodes ----------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_two_slots_per_rank_every_expert_on_both_nodes(method):
    topo = _two_nodes(2)
    res = solve_placement(_stats(), topo, method, time_limit_s=4, fault_domain="node")
    p = res.placement
    assert res.single_homed == ((), ())
    for l in range(2):
        assert p.logcnt_LE[l].tolist() == [2, 2, 2, 2]
        for e in range(4):
            assert sorted(topo.node_R[p.holders(l, e)].tolist()) == [0, 1]


def test_without_domains_experts_are_left_on_one_node():
    """The contrast: EPLB's counts spend the 4 spare slots by load per replica (3, 2, 2, 1) and
    the packing ignores nodes: experts 1 and 2 have both replicas on one node, 3 has one."""
    res = solve_placement(_stats(), _two_nodes(2), "greedy")
    assert res.placement.logcnt_LE[0].tolist() == [3, 2, 2, 1]
    assert single_homed(res.placement, np.array([0, 0, 1, 1]))[0] == (1, 2, 3)
    assert res.single_homed == ()  # no fault domain asked: nothing reported


@pytest.mark.parametrize("method", METHODS)
def test_one_spare_slot_beyond_coverage_goes_to_the_hottest(method):
    topo = _two_nodes((3, 2, 2, 2))
    res = solve_placement(_stats(), topo, method, time_limit_s=4, fault_domain="node")
    assert res.single_homed == ((), ())
    assert res.placement.logcnt_LE.tolist() == [[3, 2, 2, 2]] * 2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "slots,homed",
    [((2, 1, 2, 1), (2, 3)), ((2, 1, 1, 1), (1, 2, 3)), ((1, 1, 1, 1), (0, 1, 2, 3))],
)
def test_too_few_slots_single_homed_list_exact(method, slots, homed):
    """2 spare slots cover the two hottest experts, 1 the hottest, none nobody; the report names
    the others (the searches keep exactly the hottest; the repaired baselines as many)."""
    topo = _two_nodes(slots)
    res = solve_placement(_stats(), topo, method, time_limit_s=4, fault_domain="node")
    assert res.single_homed == single_homed(res.placement, topo.node_R)
    if method in PATHS:
        assert res.single_homed == (homed, homed)
    else:
        assert [len(h) for h in res.single_homed] == [len(homed)] * 2


@pytest.mark.parametrize("method", METHODS)
def test_rank_domains(method):
    """One node: "node" allows nothing, "rank" asks every expert on two ranks."""
    topo = Topology(4, 2)
    res = solve_placement(_stats(), topo, method, time_limit_s=4, fault_domain="rank")
    assert res.single_homed == ((), ())
    assert (res.placement.logcnt_LE >= 2).all()
    node = solve_placement(_stats(), topo, method, time_limit_s=4, fault_domain="node")
    assert node.single_homed == ((0, 1, 2, 3),) * 2
    uneven = solve_placement(_stats(), Topology(4, (2, 1, 2, 1)), method, time_limit_s=4, fault_domain="rank")
    assert [len(h) for h in uneven.single_homed] == [2, 2]


def test_counts_cover_the_hottest_then_spare_by_load_per_replica():
    topo = _two_nodes((3, 2, 2, 2))
    fd = FaultDomains.of(topo, "node", 4)
    assert fd.cover_E(LOAD).tolist() == [True] * 4
    assert replica_counts(LOAD, topo, fd.cover_E(LOAD)).tolist() == [3, 2, 2, 2]
    assert replica_counts(LOAD, topo).tolist() == [3, 3, 2, 1]  # without domains: 3 left on one rank
    low = FaultDomains.of(_two_nodes((2, 1, 2, 1)), "node", 4)
    assert low.cover_E(LOAD).tolist() == [True, True, False, False]


# ---- "none" is exactly the placement of before -----------------------------------------------

HOT = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 6, 6, 6, 4])


def _fixed_stats(E: int = 8, T: int = 240, L: int = 2):
    t, l = np.arange(T)[:, None], np.arange(L)[None, :]
    a = HOT[(5 * t + 3 * l) % len(HOT)]
    return from_topk_ids(np.stack([a, (a + 1 + (7 * t + 2 * l) % (E - 1)) % E], axis=2), E)


# the solver's answers on _fixed_stats() at commit 0804e35, before fault domains (seed 3)
BEFORE = {
    ("rep", "greedy"): [[6, 0, 2, 1, 5, 2, 1, 0, 7, 3, 4, 7], [6, 0, 4, 1, 7, 4, 1, 0, 3, 2, 5, 3]],
    ("rep", "local_search"): [[1, 0, 2, 6, 5, 7, 1, 0, 7, 3, 4, 2], [7, 1, 4, 0, 6, 3, 1, 3, 4, 2, 5, 0]],
    ("rep", "contiguous"): [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]] * 2,
    ("rep", "round_robin"): [[0, 4, 3, 1, 5, 0, 2, 6, 1, 3, 7, 2]] * 2,
    ("x2", "greedy"): [
        [5, 6, 1, 4, 0, 7, 1, 3, 0, 2, 1, 3, 7, 2, 6, 4],
        [7, 6, 1, 5, 0, 3, 1, 2, 0, 4, 1, 2, 3, 4, 6, 5],
    ],
    ("x2", "local_search"): [
        [2, 3, 1, 4, 0, 7, 1, 6, 0, 2, 1, 3, 7, 5, 6, 4],
        [7, 6, 1, 4, 5, 4, 1, 2, 3, 0, 1, 2, 3, 6, 0, 5],
    ],
    ("x2", "round_robin"): [[0, 4, 3, 7, 1, 5, 0, 4, 2, 6, 1, 5, 3, 7, 2, 6]] * 2,
    ("norep", "ilp"): [[4, 5, 0, 1, 2, 3, 7, 6], [4, 7, 2, 5, 3, 0, 6, 1]],
    ("norep", "validated"): [[4, 5, 0, 1, 2, 3, 7, 6], [4, 7, 2, 5, 3, 0, 6, 1]],
    ("rep1", "ilp"): [[2, 1, 0, 7, 1, 0, 7, 5, 6, 3, 4, 2]],
    ("agg", "ilp"): [[6, 2, 7, 1, 0, 2, 1, 0, 7, 3, 4, 5], [3, 0, 4, 1, 6, 4, 1, 0, 3, 2, 5, 7]],
}
SLOTS = {"rep": 3, "x2": 4, "norep": 2, "rep1": 3, "agg": 3}


@pytest.mark.parametrize("case,method", list(BEFORE))
def test_none_is_exactly_the_placement_of_before(case, method):
    st = _fixed_stats()
    st = st.select_layers([0]) if case == "rep1" else with_ids_dropped(st) if case == "agg" else st
    topo = Topology(4, SLOTS[case], ranks_per_node=2)
    tl = 4 if case in ("rep1", "agg") else 10
    for kw in ({}, {"fault_domain": "none"}):
        res = solve_placement(st, topo, method, time_limit_s=tl, seed=3, **kw)
        assert res.placement.phy2log_LS.tolist() == BEFORE[case, method]
        assert res.single_homed == ()


# ---- every path keeps the rule -----------------------------------------------------------------


@pytest.mark.parametrize("fault_domain", ["node", "rank"])
@pytest.mark.parametrize("ids", [True, False])
@pytest.mark.parametrize("spr", [3, 4, (5, 4, 4, 4)])
def test_every_method_keeps_the_rule(fault_domain, ids, spr):
    """8 experts on 4 ranks in 2 nodes, 12 / 16 / 17 slots, per-token ids or aggregates only."""
    st = _fixed_stats() if ids else with_ids_dropped(_fixed_stats())
    topo = Topology(4, spr, ranks_per_node=2)
    fd = FaultDomains.of(topo, fault_domain, 8)
    for method in (METHODS if ids else ["greedy", "local_search", "ilp", "contiguous"]):
        res = solve_placement(st, topo, method, time_limit_s=2, seed=1, fault_domain=fault_domain)
        assert [len(h) for h in res.single_homed] == [8 - fd.num_multi] * 2, method
        for l in range(2):
            assert fd.valid(res.placement.phy2log_LS[l])


def test_skewed_nodes_one_small_node_caps_the_multi_homed():
    """Node 0 is one rank of 4 slots: only 4 experts can have a replica there."""
    topo = Topology.from_nodes((0, 1, 1, 1), 4)
    for method in ("greedy", "ilp", "contiguous"):
        res = solve_placement(_fixed_stats(), topo, method, time_limit_s=2, fault_domain="node")
        assert [len(h) for h in res.single_homed] == [4, 4]


def test_mtkahypar_candidate_keeps_the_rule():
    from placement import mtk

    if not mtk.available():
        pytest.skip("mtkahypar not installed")
    st = _fixed_stats()
    for spr in (3, 4):
        topo = Topology(4, spr, ranks_per_node=2)
        fd = FaultDomains.of(topo, "node", 8)
        row = mtk.mtk_row(st.topk_ids_TLK[:, 0], st.load_LE[0], topo, seeds=2, domains=fd)
        assert fd.valid(row)


# ---- the exact models and the moves: constrained, and binding -----------------------------------

E7 = 7
TOPO7 = Topology(4, 2, ranks_per_node=2, origin_R=(0.5, 0.5, 0.0, 0.0))  # tokens start on node 0


def _pull_to_node0():
    """Every token needs expert 0 (two replicas) and one other: both replicas of 0 on node 0,
    where the tokens start, is the unconstrained optimum; the rule moves one to node 1."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.r_[0, rng.choice(np.arange(1, E7), 1)] for _ in range(40)])
    return ids, from_topk_ids(ids[:, None, :], E7)


def _rows_with_two_replicas_of_0():
    perms = itertools.permutations([0, 0, 1, 2, 3, 4, 5, 6])
    rows = {p for p in perms if all(p[2 * r] < p[2 * r + 1] for r in range(4))}  # each rank's pair sorted
    return [np.array(r) for r in sorted(rows)]


def test_exact_ilp_with_the_rule_reaches_the_constrained_optimum():
    ids, st = _pull_to_node0()
    fd = FaultDomains.of(TOPO7, "node", E7)
    rows = _rows_with_two_replicas_of_0()
    obj = np.array([evaluate(st, Placement(r[None], TOPO7.slots_per_rank, E7), TOPO7, load_weight=0.1).objective
                    for r in rows])
    valid = np.array([fd.valid(r) for r in rows])
    assert obj.min() < obj[valid].min() - 1e-9  # the rule binds here
    warm = rows[int(np.flatnonzero(valid)[0])]
    hg = build_hypergraph(ids, np.bincount(warm, minlength=E7))
    srank = np.repeat(np.arange(4), 2)
    out = {}
    for name, span in (("free", None), ("rule", (fd.domain_R, fd.multi_homed_E(warm)))):
        res = solve_exact(hg, TOPO7.send_weight_R, np.full(4, 2), 0.1, np.zeros((hg.num_vertices, 4)),
                          warm_V=rank_of_vertices(warm, srank), time_limit_s=30, max_edges=1000, span=span)
        row = row_from_ranks(res.rank_V, hg.expert_V, np.full(4, 2))
        out[name] = (row, evaluate(st, Placement(row[None], TOPO7.slots_per_rank, E7), TOPO7,
                                   load_weight=0.1).objective)
    assert out["free"][1] == pytest.approx(obj.min()) and not fd.valid(out["free"][0])
    assert out["rule"][1] == pytest.approx(obj[valid].min()) and fd.valid(out["rule"][0])


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_pairwise_ilp_with_the_rule_reaches_the_constrained_optimum(solver):
    from placement.ilp import HAVE_HIGHS

    if solver == "highs" and not HAVE_HIGHS:
        pytest.skip("highspy not installed")
    _, st = _pull_to_node0()
    fd = FaultDomains.of(TOPO7, "node", E7)
    cnt = np.array([2, 1, 1, 1, 1, 1, 1])
    T = st.num_tokens
    pairs, q = top_pairs(st.coact_LEE[0], cnt, 100)
    share = st.load_LE[0] / cnt / T
    args = (share, cnt, pairs, q / T, TOPO7.send_weight_R, np.full(4, 2), np.zeros((E7, 4)), 0.1, None)
    cover = np.arange(E7) == 0
    free, rule = LayerModel(*args), LayerModel(*args, span=(fd.domain_R, cover))
    srank = np.repeat(np.arange(4), 2)
    rows = _rows_with_two_replicas_of_0()
    value = {name: np.array([model_objective(m, holders_ER(r, srank, E7, 4)) for r in rows])
             for name, m in (("free", free), ("rule", rule))}
    valid = np.array([fd.valid(r) for r in rows])
    assert value["free"].min() < value["free"][valid].min() - 1e-9
    res = solve_layer_model(rule, time_limit_s=30, solver=solver)
    assert sorted(TOPO7.node_R[res.rank_sets[0]].tolist()) == [0, 1]
    assert res.objective == pytest.approx(value["free"][valid].min(), abs=1e-7)


def test_searches_and_moves_never_single_home_a_multi_homed_expert():
    """From the greedy row (expert 0 on both nodes) the swap search, tabu, perturbation and FM
    without the rule put both replicas of 0 on node 0; with it they keep 0 on both nodes."""
    ids, st = _pull_to_node0()
    fd = FaultDomains.of(TOPO7, "node", E7)
    start = greedy_layer(st.load_LE[0], TOPO7, fd)
    assert fd.valid(start)
    free = local_search_layer(st, 0, TOPO7, start, load_weight=0.1)
    assert not fd.valid(free)  # the rule binds for the search
    kept = local_search_layer(st, 0, TOPO7, start, load_weight=0.1, domains=fd)
    assert fd.valid(kept)
    row, _ = tabu_search_layer(st, 0, TOPO7, start, iters=60, seed=0, load_weight=0.1, domains=fd)
    assert fd.valid(row)
    rng = np.random.default_rng(0)
    assert all(fd.valid(perturb(start, TOPO7, rng, 12, fd)) for _ in range(20))
    hg = build_hypergraph(ids, np.bincount(start, minlength=E7))
    srank = np.repeat(np.arange(4), 2)
    fm = fm_refine(hg, rank_of_vertices(start, srank), TOPO7.send_weight_R, np.full(4, 2), 0.1, domains=fd)
    assert fd.valid(row_from_ranks(fm, hg.expert_V, np.full(4, 2)))


def test_pipeline_with_the_rule_on_the_binding_case():
    _, st = _pull_to_node0()
    free = solve_placement(st, TOPO7, "ilp", time_limit_s=3, load_weight=0.1)
    rule = solve_placement(st, TOPO7, "ilp", time_limit_s=3, load_weight=0.1, fault_domain="node")
    fd = FaultDomains.of(TOPO7, "node", E7)
    assert rule.single_homed == ((1, 2, 3, 4, 5, 6),)  # the hottest (0) is the multi-homed one
    assert fd.valid(rule.placement.phy2log_LS[0])
    assert free.cost.objective <= rule.cost.objective  # the rule costs traffic here, never saves


def test_repair_makes_a_row_valid_hottest_first():
    fd = FaultDomains.of(_two_nodes(2), "node", 4)
    row = np.array([0, 1, 0, 1, 2, 3, 2, 3])  # every expert on one node only
    assert fd.multi_homed_E(row).sum() == 0
    fixed = fd.repair(row, LOAD)
    assert fd.valid(fixed) and np.bincount(fixed, minlength=4).min() >= 1
    low = FaultDomains.of(_two_nodes((2, 1, 2, 1)), "node", 4)
    row = np.array([0, 1, 0, 2, 3, 1])  # 0 on node 0 twice, 1 on both: one multi-homed of 2
    assert not low.valid(row)
    fixed = low.repair(row, LOAD)
    assert low.valid(fixed) and low.multi_homed_E(fixed)[:2].all()  # the two hottest
