"""The cost model on hand-made cases with hand-computed values."""

import numpy as np
import pytest

from placement.cost import evaluate
from placement.placement import Placement, PlacementError
from placement.stats import from_topk_ids, with_ids_dropped
from placement.topology import Topology, TopologyError


def _p(rows, spr, E):
    return Placement(np.array(rows), spr, E)


def test_dedup_two_experts_same_remote_rank_is_one_send():
    # one token choosing experts 0 and 1, both on rank 1 of 2; origin uniform
    s = from_topk_ids(np.array([[[0, 1]]]), 4)
    topo = Topology(2, 2)
    together = _p([[2, 3, 0, 1]], (2, 2), 4)  # rank 0: {2,3}, rank 1: {0,1}
    c = evaluate(s, together, topo)
    # from rank 0 (p=1/2): one send to rank 1; from rank 1: local -> 0.5 sends expected
    assert c.sends == pytest.approx(0.5)
    split = _p([[0, 2, 1, 3]], (2, 2), 4)  # experts 0 and 1 on different ranks
    assert evaluate(s, split, topo).sends == pytest.approx(1.0)  # always exactly one remote


def test_link_costs_and_load():
    # 4 ranks, 2 per node; token picks experts 0 (rank 0) and 3 (rank 3)
    s = from_topk_ids(np.array([[[0, 3]], [[0, 1]]]), 4)
    topo = Topology(4, 1, ranks_per_node=2, intra_node_cost=1.0, inter_node_cost=4.0)
    p = Placement.contiguous(1, 4, 4)
    c = evaluate(s, p, topo, load_weight=0.0)
    # need rank0: 2 tokens, rank1: 1, rank3: 1. send weight: r0,r1 = (0+1+4+4)/4 = 2.25 each
    assert c.traffic == pytest.approx((2 * 2.25 + 2.25 + 2.25) / 2)
    assert c.sends == pytest.approx((2 * 0.75 + 0.75 + 0.75) / 2)
    assert c.max_load_L[0] == pytest.approx(2 / 2)  # rank 0 computes 2 token-expert pairs
    assert c.imbalance == pytest.approx(1.0 / (4 / 4 / 2))
    assert c.objective == pytest.approx(c.traffic)


def test_replicas_split_tokens_evenly():
    # expert 0 on ranks 0 and 1: tokens 0, 2 use its first replica (rank 0), token 1 the second
    s = from_topk_ids(np.array([[[0, 1]], [[0, 1]], [[0, 2]]]), 3)
    topo = Topology(2, 2)
    p = _p([[0, 1, 0, 2]], (2, 2), 3)  # rank 0 {0, 1}, rank 1 {0, 2}
    c = evaluate(s, p, topo, load_weight=0.0)
    # token 0: {rank 0} -> 0.5 sends; token 1: ranks {1, 0} -> 1; token 2: ranks {0, 1} -> 1
    assert c.sends == pytest.approx(2.5 / 3)
    # rank 0 computes t0's two experts, t1's expert 1, t2's expert 0; rank 1 the other two
    assert c.max_load_L[0] == pytest.approx(4 / 3) and c.imbalance == pytest.approx(4 / 3)



def test_pairwise_equals_exact_for_top2_and_underestimates_for_top3():
    rng = np.random.default_rng(0)
    ids2 = np.stack([rng.choice(6, 2, replace=False) for _ in range(200)])[:, None, :]
    s2 = from_topk_ids(ids2, 6)
    topo = Topology(2, 3)
    for seed in range(5):
        p = Placement.random(1, 6, 2, seed=seed)
        assert evaluate(s2, p, topo).objective == pytest.approx(evaluate(with_ids_dropped(s2), p, topo).objective)
    ids3 = np.stack([rng.choice(6, 3, replace=False) for _ in range(200)])[:, None, :]
    s3 = from_topk_ids(ids3, 6)
    p = Placement.contiguous(1, 6, 2)
    assert evaluate(with_ids_dropped(s3), p, topo).sends < evaluate(s3, p, topo).sends


def test_migration_counts_new_copies():
    s = from_topk_ids(np.array([[[0, 1]]]), 4)
    topo = Topology(2, 2)
    cur = Placement.contiguous(1, 4, 2)  # {0,1} {2,3}
    new = _p([[0, 2, 1, 3]], (2, 2), 4)  # experts 1 and 2 swap ranks
    c = evaluate(s, new, topo, current=cur, migration_weight=0.5, expert_bytes=3.0)
    assert c.migration == pytest.approx(2 * 3.0)
    base = evaluate(s, new, topo)
    assert c.objective == pytest.approx(base.objective + 0.5 * 6.0)


def test_transition_hops():
    # layer 0 expert 0 -> layer 1 expert 1; together on rank 0 in one placement, apart in another
    s = from_topk_ids(np.array([[[0], [1]]]), 2)
    topo = Topology(2, 1)
    apart = Placement(np.array([[0, 1], [0, 1]]), (1, 1), 2)
    together = Placement(np.array([[0, 1], [1, 0]]), (1, 1), 2)
    assert evaluate(s, apart, topo).hops_L[0] == 1.0
    assert evaluate(s, together, topo).hops_L[0] == 0.0


def test_mismatch_errors():
    s = from_topk_ids(np.array([[[0, 1]]]), 4)
    with pytest.raises(PlacementError, match="slots_per_rank"):
        evaluate(s, Placement.contiguous(1, 4, 2), Topology(4, 1))
    with pytest.raises(PlacementError, match="experts"):
        evaluate(s, Placement.contiguous(1, 6, 2), Topology(2, 3))
    with pytest.raises(TopologyError, match="ranks_per_node"):
        Topology(4, 1, ranks_per_node=3)
    with pytest.raises(TopologyError, match="origin_R"):
        Topology(2, 1, origin_R=(0.9, 0.9))
    with pytest.raises(TopologyError, match="cannot hold"):
        Topology(2, 1).check_experts(4)


def test_token_sends_by_hand_and_their_mean_is_evaluate():
    from placement.cost import token_sends_T
    # 2 ranks x 2 slots, experts {0, 1} on rank 0, {2, 3} on rank 1; one layer, top-2
    ids = np.array([[0, 1], [0, 2], [2, 3], [1, -1]])[:, None, :]
    stats = from_topk_ids(ids, 4)
    topo = Topology(2, 2)
    p = Placement(np.array([[0, 1, 2, 3]]), topo.slots_per_rank, 4)
    # uniform origin: a token reaching ranks {r} sends sum_r (1 - 1/2); {0, 2} reaches both
    assert token_sends_T(stats, p, topo).tolist() == [0.5, 1.0, 0.5, 0.5]
    # home ranks 0, 1, 1, 0: a token sends once per rank other than its home that it needs
    homed = from_topk_ids(ids, 4, home_T=np.array([0, 1, 1, 0]))
    assert token_sends_T(homed, p, topo).tolist() == [0.0, 1.0, 0.0, 0.0]
    # replicas, two layers, two link costs, skewed origin: the mean is evaluate()'s sends
    rng = np.random.default_rng(7)
    ids2 = np.stack([rng.permutation(6)[:3] for _ in range(50 * 2)]).reshape(50, 2, 3)
    stats2 = from_topk_ids(ids2, 6)
    topo2 = Topology(4, 2, ranks_per_node=2, inter_node_cost=3.0, origin_R=(0.4, 0.3, 0.2, 0.1))
    p2 = Placement(np.array([[0, 2, 1, 3, 0, 4, 1, 5], [5, 4, 3, 2, 1, 0, 0, 1]]), topo2.slots_per_rank, 6)
    got = token_sends_T(stats2, p2, topo2)
    assert got.shape == (50,) and got.mean() == pytest.approx(evaluate(stats2, p2, topo2).sends, abs=1e-12)
    # with home ranks and replicas the dispatcher's rule (the home's own replica first), as in evaluate()
    homed2 = from_topk_ids(ids2, 6, home_T=rng.integers(0, 4, size=50))
    got = token_sends_T(homed2, p2, topo2)
    assert got.mean() == pytest.approx(evaluate(homed2, p2, topo2).sends, abs=1e-12)
    # by hand: expert 0 on ranks 0 and 2; a token of home 2 needing only expert 0 uses its own replica
    rep = Placement(np.array([[0, 1, 2, 3, 0, 4]]), (2, 2, 2), 5)
    one = from_topk_ids(np.array([[[0]], [[0]]]), 5, home_T=np.array([2, 1]))
    assert token_sends_T(one, rep, Topology(3, 2)).tolist() == [0.0, 1.0]
