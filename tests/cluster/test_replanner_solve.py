"""The re-planner's solve (the function its Ray task runs), in process: placement.method selects
the solver, and the proposal carries what the solver saw."""

from __future__ import annotations

import numpy as np

from cluster.replacement import _solve
from placement import Placement, Topology, from_topk_ids


def test_placement_method_selects_the_solver_and_the_proposal_records_the_statistics():
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(400)])
    ids[:200, :, :] = [[0, 1], [0, 1]]  # a hot pair of experts
    stats = from_topk_ids(ids.astype(np.int64), 8)
    topo = Topology(num_ranks=4, slots_per_rank=(2, 2, 2, 2))
    current = Placement.contiguous(2, 8, 4)
    greedy = _solve(stats, topo, current, "greedy", 2.0, 1.0, 0.0, 0, val_fraction=0.0)  # judged on the fit
    ilp = _solve(stats, topo, current, "ilp", 2.0, 1.0, 0.0, 0, val_fraction=0.0)
    assert (greedy.solver, greedy.status) == ("none", "heuristic")  # no MIP behind "greedy"
    assert ilp.solver in ("highs", "cbc") and ilp.status == "optimal"  # proven on this small case
    assert ilp.cost_after < greedy.cost_after < greedy.cost_before  # the ILP beats greedy here
    assert ilp.bound is not None and ilp.bound <= ilp.cost_after + 1e-9
    assert ilp.sample_tokens == 400 and greedy.sample_tokens == 400
