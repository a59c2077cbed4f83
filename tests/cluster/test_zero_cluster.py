"""ZeRO-1 through the real controller on 2 Ray actors: live re-placement moves experts (with their
local AdamW state) while DeepSpeed holds the dense state, and a killed actor resumes from the last
checkpoint (dense state gathered on save, resliced on load); both runs follow the losses of the
uninterrupted ZeRO-1 run without re-placement."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.api import run
from cluster.controller import State
from moetrain.config import from_dict
from tests.cluster.faults import killer

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def cfg(tmp_path, name: str, *, replan_every: int = 0, max_failures: int = 0):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 9, "global_batch_size": 8, "warmup_steps": 2, "eval_every": 0, "log_every": 100,
                  "zero_stage": 1},
        "checkpoint": {"uri": str(tmp_path / "ckpt"), "every": 3},
        "cluster": {"num_workers": 2, "run_name": name, "max_failures": max_failures},
        "placement": {"replan_every": replan_every, "min_gain": -1.0, "method": "ilp", "time_limit_s": 2,
                      "blocking": True, "window": 3, "sample_tokens": 1000},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
    })


@pytest.fixture(scope="module")
def static_zero(tmp_path_factory, ray_local):
    return run(cfg(tmp_path_factory.mktemp("zero-static"), "zstatic"))


def losses(result) -> np.ndarray:
    return np.array([h.loss for h in result.history])


def test_live_replacement_with_zero_1(tmp_path, static_zero):
    moving = run(cfg(tmp_path, "zmoving", replan_every=3))
    assert moving.state == State.FINISHED
    assert [d for d in moving.replacements if d.migrated], moving.replacements
    np.testing.assert_allclose(losses(moving), losses(static_zero), rtol=1e-5)


def test_killed_actor_resumes_with_zero_1(tmp_path, static_zero):
    faulty = run(cfg(tmp_path, "zfaulty", max_failures=1), on_step=killer("zfaulty", at_step=5))
    assert faulty.state == State.FINISHED and faulty.restarts == 1
    assert [h.step for h in faulty.history] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9]
    np.testing.assert_allclose(losses(faulty)[-6:], losses(static_zero)[-6:], rtol=1e-6)
