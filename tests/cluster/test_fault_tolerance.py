"""Failure handling through the real controller: a killed worker actor -> the group is rebuilt and
the run resumes from the last committed checkpoint; an exhausted failure budget -> FAILED with a
grouped message; a group that can never start -> a typed, readable error at once."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.api import RunFailed, run
from cluster.controller import State
from moetrain.config import from_dict
from tests.cluster.faults import killer

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def cfg(tmp_path, name: str, max_failures: int, **cluster):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 9, "global_batch_size": 8, "warmup_steps": 2, "eval_every": 0, "log_every": 100},
        "checkpoint": {"uri": str(tmp_path / "ckpt"), "every": 3},
        "cluster": {"num_workers": 2, "run_name": name, "max_failures": max_failures, **cluster},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
    })


def test_killed_actor_resumes_from_last_checkpoint(tmp_path, ray_local):
    clean = run(cfg(tmp_path, "clean", 0))
    faulty = run(cfg(tmp_path, "faulty", 1), on_step=killer("faulty", at_step=5))
    assert faulty.state == State.FINISHED and faulty.restarts == 1
    steps = [h.step for h in faulty.history]
    assert steps == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9], steps  # resumed from the step-3 checkpoint
    # Resume is exact, so the run ends where the uninterrupted one does.
    assert faulty.history[-1].loss == pytest.approx(clean.history[-1].loss, rel=1e-6)
    np.testing.assert_allclose([h.loss for h in faulty.history[-6:]], [h.loss for h in clean.history[-6:]],
                               rtol=1e-6)


def test_exhausted_failure_budget_ends_failed_with_grouped_message(tmp_path, ray_local):
    with pytest.raises(RunFailed) as exc:
        run(cfg(tmp_path, "doomed", 0), on_step=killer("doomed", at_step=2))
    assert "[Rank 1]: actor died" in str(exc.value)
    result = run(cfg(tmp_path, "doomed2", 0), on_step=killer("doomed2", at_step=2), raise_on_failure=False)
    assert result.state == State.FAILED and "train_step failed" in result.error


def test_group_that_cannot_fit_fails_at_once_with_the_numbers(tmp_path, ray_local):
    result = run(cfg(tmp_path, "gpu", 0, use_gpu=True), raise_on_failure=False)
    assert result.state == State.FAILED
    assert "need 2 GPU (the Ray cluster has 0)" in result.error


def test_actor_lost_at_the_last_step_restarts_and_redoes_the_final_checkpoint(tmp_path, ray_local):
    """A rank lost after the last step (in the final evaluation and checkpoint, as a node lost
    late would be) is a lost worker like any other: the run resumes from the step-6 commit,
    redoes steps 7-9, commits step 9 and FINISHES; without a failure budget it FAILS."""
    result = run(cfg(tmp_path, "late", 1), on_step=killer("late", at_step=9))
    assert result.state == State.FINISHED and result.restarts == 1, result.error
    assert [h.step for h in result.history][-4:] == [9, 7, 8, 9]
    assert [c.rsplit("step-", 1)[1] for c in result.checkpoints] == ["3", "6", "9"]
    doomed = run(cfg(tmp_path, "late0", 0), on_step=killer("late0", at_step=9), raise_on_failure=False)
    assert doomed.state == State.FAILED and "actor died" in doomed.error, doomed.error


def test_rank_dying_while_it_uploads_is_reported_as_a_lost_worker(tmp_path, ray_local):
    """The commit thread tells a dead rank (a lost node: retried) from a failed upload (the
    store: training goes on); a later successful attempt at the same step clears the failure."""
    import ray

    from cluster.checkpointing import Coordinator
    from cluster.group import WorkerGroupError

    @ray.remote
    class Sleeper:
        def wait(self):
            return "upload failed: store said no"

    live, dead = Sleeper.remote(), Sleeper.remote()
    ray.get(live.wait.remote())
    ray.kill(dead, no_restart=True)
    c = Coordinator(cfg(tmp_path, "unit", 0))
    c._commit([live.wait.remote(), dead.wait.remote()], 4, {}, 0.0)
    lost = c.lost_worker(4)
    assert isinstance(lost, WorkerGroupError) and lost.lost and lost.ranks == [1], lost
    assert "Rank 1" in c.step_failed(4) and c.consecutive_failures == 1
    c._commit([live.wait.remote(), live.wait.remote()], 4, {}, 0.0)  # both alive, both failed: the store
    assert c.lost_worker(4) is None and "store said no" in c.step_failed(4)
