"""Traffic counters: hand-computed bytes of the ring estimate, peer sends and the per-step record
(no processes); the all-to-all byte counts of both dispatch modes on a fixed routing are checked
against hand computation in test_hierarchical.py (one gloo spawn for both)."""

from __future__ import annotations

import numpy as np
import pytest

from moetrain.parallel.traffic import TrafficCounter, ring_allreduce_bytes

NODES_2x2 = (0, 0, 1, 1)


def test_ring_allreduce_estimate_is_2_r_minus_1_over_r():
    assert ring_allreduce_bytes(1000, 4) == 1500
    assert ring_allreduce_bytes(1000, 1) == 0
    assert ring_allreduce_bytes(999, 2) == 999


def test_ring_crosses_nodes_where_the_successor_is_on_another_node():
    """Ring 0->1->2->3->0 on 2 nodes x 2 ranks: 1->2 and 3->0 cross (inter), 0->1, 2->3 do not."""
    total = np.zeros(2)
    for rank in range(4):
        c = TrafficCounter(rank, 4, NODES_2x2, num_layers=1)
        c.add_ring_allreduce("dense_grads", 1000)
        total += c.decode(c.drain()).dense_grads_C
    np.testing.assert_array_equal(total, [3000, 3000])
    # uneven 1 + 3: only 0->1 and 3->0 cross
    total = np.zeros(2)
    for rank in range(4):
        c = TrafficCounter(rank, 4, (0, 1, 1, 1), num_layers=1)
        c.add_ring_allreduce("dense_grads", 1000)
        total += c.decode(c.drain()).dense_grads_C
    np.testing.assert_array_equal(total, [3000, 3000])
    one = TrafficCounter(3, 4, (), num_layers=1)  # one node: everything intra
    one.add_ring_allreduce("expert_grads", 1000)
    np.testing.assert_array_equal(one.decode(one.vector()).expert_grads_C, [1500, 0])


def test_peer_sends_skip_self_and_split_by_node_and_drain_resets():
    c = TrafficCounter(1, 4, NODES_2x2, num_layers=2)
    c.add_peer("migration", [100, 7, 20, 3])  # 7 bytes to itself: a local copy, not counted
    c.add_checkpoint(5000)
    t = c.decode(c.drain())
    np.testing.assert_array_equal(t.migration_C, [100, 23])
    assert t.checkpoint_bytes == 5000
    assert t.by_kind()["migration"] == (100.0, 23.0) and t.inter_bytes == 23 and t.intra_bytes == 100
    assert t.a2a_LPC.shape == (2, 2, 2) and not t.a2a_LPC.any()
    again = c.decode(c.drain())
    assert again.inter_bytes == 0 and again.checkpoint_bytes == 0


def test_a_node_map_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="3 entries for 4 ranks"):
        TrafficCounter(0, 4, (0, 0, 1), num_layers=1)


def test_a_rank_that_sends_no_rows_counts_zero_bytes():
    """An all-to-all whose input has no rows (every token routed to other ranks' replies, or a
    batch that sends nothing) counts nothing and does not fail (it used to index row 0)."""
    import torch

    c = TrafficCounter(0, 4, NODES_2x2, num_layers=1)
    tally = c.layer(0)
    tally.sent(torch.empty(0, 16), [0, 0, 0, 0])
    tally.sent(torch.empty(3, 16), [1, 0, 2, 0])  # 1 row to itself (not counted), 2 rows to node 1
    t = c.decode(c.drain())
    np.testing.assert_array_equal(t.a2a_LPC[0, 0], [0, 2 * 16 * 4])


def test_an_all_to_all_that_receives_no_rows_counts_zero_bytes():
    """A rank whose slots got no rows returns an empty [0, D] tensor in combine: it sends nothing
    (this raised IndexError in the 4-rank uneven-placement equivalence run)."""
    import torch

    c = TrafficCounter(0, 2, (0, 1), num_layers=1)
    c.layer(0).sent(torch.zeros(0, 4), [0, 0])
    c.layer(0).sent(torch.zeros(3, 4), [1, 2])  # 2 rows of 16 bytes to rank 1, another node
    assert c.decode(c.drain()).a2a_LPC[0].tolist() == [[0, 32], [0, 0]]
