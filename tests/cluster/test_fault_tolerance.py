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
