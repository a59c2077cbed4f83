"""The gang's pure parts (no Ray): rank order from where bundles landed, and which bundles do not
fit what the nodes have free under each placement strategy (hand-computed)."""

from __future__ import annotations

import pytest

from cluster.gang import order_ranks, unfit_bundles


def test_order_ranks_groups_nodes_driver_first():
    # bundles 0..4 on nodes b, a, b, c, a; the driver runs on c
    lay = order_ranks(["b", "a", "b", "c", "a"], first_node="c")
    assert lay.node_ids == ("c", "b", "a") and lay.num_nodes == 3
    assert lay.bundle_of_rank == (3, 0, 2, 1, 4) and lay.node_of_rank == (0, 1, 1, 2, 2)
    # the driver's node holds no bundle: nodes in the order of their lowest bundle index
    assert order_ranks(["b", "a", "b"], first_node="z").node_of_rank == (0, 0, 1)
    assert order_ranks(["b", "a", "b"]).bundle_of_rank == (0, 2, 1)


ONE = {"CPU": 1.0}


@pytest.mark.parametrize("strategy,free,short", [
    ("PACK", [{"CPU": 2}, {"CPU": 1}], []),            # 3 bundles fit 2 + 1
    ("PACK", [{"CPU": 2}, {"CPU": 0.5}], [2]),         # the third fits nowhere
    ("SPREAD", [{"CPU": 1}, {}, {"CPU": 1}], [2]),     # the head (no CPU) holds none
    ("STRICT_PACK", [{"CPU": 2}, {"CPU": 2}], [2]),    # one node must take all three
    ("STRICT_PACK", [{"CPU": 1}, {"CPU": 3}], []),
    ("STRICT_SPREAD", [{"CPU": 4}, {"CPU": 4}], [2]),  # one bundle per node: two nodes, three bundles
])
def test_unfit_bundles_by_strategy(strategy, free, short):
    assert unfit_bundles([ONE] * 3, free, strategy) == short


def test_unfit_bundles_counts_gpus():
    gpu = {"CPU": 1.0, "GPU": 1.0}
    assert unfit_bundles([gpu, gpu], [{"CPU": 8, "GPU": 1}, {"CPU": 8}], "PACK") == [1]
