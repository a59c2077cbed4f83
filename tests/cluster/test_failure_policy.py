"""The failure policy's verdicts (no Ray): lost actors are retried within the budget, also while the
group starts (a node went away); a group that cannot start or be placed is not."""

from __future__ import annotations

from cluster.controller import FailurePolicy
from cluster.group import WorkerGroupError, WorkerGroupStartError


def test_lost_actors_are_retried_within_the_budget_also_while_starting():
    p = FailurePolicy(max_failures=2)
    assert p.should_retry(WorkerGroupError("train_step failed", [1], lost=True))
    assert p.should_retry(WorkerGroupStartError("could not start: actor died", [0], lost=True))
    assert not p.should_retry(WorkerGroupError("train_step failed", [1], lost=True))  # third: budget spent
    assert p.failures == 3


def test_groups_that_cannot_start_are_not_retried():
    p = FailurePolicy(max_failures=5)
    assert not p.should_retry(WorkerGroupStartError("setup failed: bad checkpoint", [0, 1], lost=False))
    assert not p.should_retry(WorkerGroupStartError("cannot place the worker group", [], False, unplaceable=True))
    assert not p.should_retry(RuntimeError("not a group error"))
    assert p.failures == 1  # start errors spend nothing; other errors count and are not retried
