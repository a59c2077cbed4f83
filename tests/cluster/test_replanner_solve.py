"""The re-planner's solve (the function its Ray task runs), in process: placement.method selects
the solver, the proposal carries what the solver saw, and min_gain is judged on the newest steps
of the window (placement.val_fraction), which the solver did not fit."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.replacement import Decision, _solve
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


def _drift_window():
    """One layer, 4 experts, top-2, 5 steps of 100 tokens: steps 0-3 pair experts {0,1} and {2,3};
    step 4 (the newest: the validation step) pairs {0,2} and {1,3}."""
    old = [[0, 1], [2, 3]] * 200
    new = [[0, 2], [1, 3]] * 50
    ids = np.array(old + new)[:, None, :]
    return from_topk_ids(ids, 4, step_T=np.repeat(np.arange(5), 100))


def test_min_gain_is_judged_on_the_validation_steps_not_the_fit():
    """Current placement {0,2}|{1,3} (good for the newest step). The solver fits on steps 0-3 and
    proposes {0,1}|{2,3}. Load weight 0, 2 ranks, a send costs 1 - 1/2 per other rank needed:
    whole window: current (400 x 1.0 + 100 x 0.5) / 500 = 0.9, proposal (400 x 0.5 + 100 x 1.0) / 500
    = 0.6 (fit gain 1/3); validation step: current 0.5, proposal 1.0 (gain -100%): rejected at
    min_gain 0.05 when judged on validation, accepted when judged on the fit (val_fraction 0)."""
    stats, topo = _drift_window(), Topology(num_ranks=2, slots_per_rank=(2, 2))
    current = Placement(np.array([[0, 2, 1, 3]]), (2, 2), 4)
    prop = _solve(stats, topo, current, "ilp", 5.0, 0.0, 0.0, 0, val_fraction=0.2)
    assert prop.validated and prop.val_tokens == 100
    assert (prop.cost_before, prop.cost_after) == pytest.approx((0.9, 0.6))
    assert prop.fit_gain == pytest.approx(1 / 3)
    assert (prop.val_before, prop.val_after) == pytest.approx((0.5, 1.0))
    assert prop.predicted_gain == pytest.approx(-1.0)  # min_gain (0.05) judged on this: kept current
    assert prop.val_before_L == pytest.approx((0.5,)) and prop.fit_after_L == pytest.approx((0.5,))
    assert prop.candidate_L[0].startswith("ilp") and prop.refit_L == (True,)
    on_fit = _solve(stats, topo, current, "ilp", 5.0, 0.0, 0.0, 0, val_fraction=0.0)
    assert not on_fit.validated and on_fit.predicted_gain == pytest.approx(1 / 3)  # >= 0.05: migrates
    rec = Decision(step=5, launched_step=4, proposal=prop, migrated=False).to_dict()
    assert rec["judged_on"] == "validation" and rec["predicted_gain"] == pytest.approx(-1.0)
    assert rec["fit_gain"] == pytest.approx(1 / 3) and "placement" not in rec


def test_validated_method_in_the_replanner_reports_its_candidates():
    stats = _drift_window()
    topo = Topology(num_ranks=2, slots_per_rank=(2, 2))
    current = Placement(np.array([[0, 1, 2, 3]]), (2, 2), 4)
    prop = _solve(stats, topo, current, "validated", 5.0, 1.0, 0.0, 0, val_fraction=0.2)
    assert prop.validated and prop.status == "validated"
    assert prop.candidate_L[0].split(":")[0] in ("ilp", "ilp_lw0", "ilp_lw_half", "ilp_lw_x2", "ilp_seed1",
                                                  "ilp_recent", "bagged", "greedy", "mtkahypar",
                                                  "mtkahypar_ls", "mtkahypar_ls_lw")
    assert prop.solve_time_s <= 5.0 * 1.5 + 1.0
