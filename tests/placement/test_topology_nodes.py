"""Topology with a rank -> node map (the layout a cluster's ranks really landed on): link costs,
nodes of different sizes, sub-topologies and the hierarchical split, all hand-computed."""

from __future__ import annotations

import numpy as np
import pytest

from placement import Placement, evaluate, from_topk_ids
from placement.solve import solve_placement
from placement.stats import with_ids_dropped
from placement.topology import Topology, TopologyError


def test_uneven_nodes_link_costs_by_hand():
    # rank 0 alone on node 0, ranks 1-3 on node 1 (nodes of 1 and 3 CPUs)
    topo = Topology.from_nodes((0, 1, 1, 1), 2, intra_node_cost=1.0, inter_node_cost=5.0)
    assert topo.num_nodes == 2 and topo.ranks_N.tolist() == [1, 3] and topo.ranks_per_node == 0
    assert topo.link_cost_RR.tolist() == [[0, 5, 5, 5],
                                          [5, 0, 1, 1],
                                          [5, 1, 0, 1],
                                          [5, 1, 1, 0]]
    # uniform origin 1/4: send_weight[0] = 3 * 5 / 4; send_weight[1] = (5 + 1 + 1) / 4
    np.testing.assert_allclose(topo.send_weight_R, [15 / 4, 7 / 4, 7 / 4, 7 / 4])
    assert "ranks per node=[1, 3]" in repr(topo)


def test_uniform_map_equals_the_ranks_per_node_shorthand():
    by_map = Topology.from_nodes((0, 0, 1, 1), 3, inter_node_cost=3.0)
    by_rpn = Topology(4, 3, ranks_per_node=2, inter_node_cost=3.0)
    assert by_map.ranks_per_node == 2 and by_rpn.node_of_rank == (0, 0, 1, 1)
    np.testing.assert_array_equal(by_map.link_cost_RR, by_rpn.link_cost_RR)
    assert Topology(3, 1).node_of_rank == (0, 0, 0) and Topology(3, 1).num_nodes == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(node_of_rank=(0, 1)), "node_of_rank has 2 entries for num_ranks=3"),
    (dict(node_of_rank=(0, 2, 2)), r"must number its nodes 0..N-1"),
    (dict(node_of_rank=(0, 0, 1), ranks_per_node=1), r"ranks_per_node \(1\) does not match node_of_rank"),
])
def test_bad_node_maps_name_the_field(kwargs, match):
    with pytest.raises(TopologyError, match=match):
        Topology(3, 1, **kwargs)


def test_sub_keeps_the_node_structure_and_renumbers():
    topo = Topology.from_nodes((0, 1, 1, 2, 2, 2), 1, inter_node_cost=4.0)
    sub = topo.sub([2, 3, 5])  # one rank of node 1, two of node 2
    assert sub.node_of_rank == (0, 1, 1) and sub.num_nodes == 2
    assert sub.link_cost_RR.tolist() == [[0, 4, 4], [4, 0, 1], [4, 1, 0]]
    one = topo.sub([3, 4, 5])  # one node: only intra-node costs
    assert one.num_nodes == 1 and one.ranks_per_node == 3 and one.link_cost_RR.max() == 1.0


def test_cost_model_charges_the_real_layout():
    # every token uses experts {0, 1}; expert 0 on rank 0, expert 1 on rank 1 (contiguous, 1 slot
    # each). Ranks 0 and 1 on different nodes -> the off-rank half of the sends costs 4, same node -> 1.
    ids = np.array([[0, 1]] * 8)[:, None, :]
    stats = from_topk_ids(ids, 3)
    p = Placement.contiguous(1, 3, 3)
    split = evaluate(stats, p, Topology.from_nodes((0, 1, 1), 1, inter_node_cost=4.0))
    together = evaluate(stats, p, Topology.from_nodes((0, 0, 1), 1, inter_node_cost=4.0))
    # origin uniform over 3 ranks: expert-0 rows reach rank 0 from ranks 1, 2; expert-1 rows rank 1 from 0, 2
    assert split.traffic == pytest.approx((4 + 4) / 3 + (4 + 1) / 3)
    assert together.traffic == pytest.approx((1 + 4) / 3 + (1 + 4) / 3)


def test_hierarchical_split_follows_uneven_nodes():
    # 6 experts, 3 ranks of 2 slots: node 0 = rank 0, node 1 = ranks 1, 2. Experts {0, 1} always
    # come together, so do {2, 3} and {4, 5}: each pair must share a rank.
    rng = np.random.default_rng(0)
    pairs = np.array([[0, 1], [2, 3], [4, 5]])
    ids = pairs[rng.integers(0, 3, 300)][:, None, :]
    stats = with_ids_dropped(from_topk_ids(ids, 6))
    topo = Topology.from_nodes((0, 1, 1), 2, inter_node_cost=4.0)
    res = solve_placement(stats, topo, "ilp", time_limit_s=2.0, hierarchical=True)
    assert res.layers[0].hierarchical
    holders = {tuple(sorted(res.placement.local_experts(0, r).tolist())) for r in range(3)}
    assert holders == {(0, 1), (2, 3), (4, 5)}
    assert res.cost.sends == pytest.approx(evaluate(stats, res.placement, topo).sends)
