"""Live re-placement on 4 actors: experts (weights + AdamW state) really move mid-run, and the
loss trajectory equals the run without re-placement (the equivalence tolerance)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.api import run
from moetrain.config import from_dict
from placement.placement import Placement

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def cfg(tmp_path, name: str, replan_every: int):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 14, "global_batch_size": 8, "grad_accum_steps": 1, "warmup_steps": 2,
                  "eval_every": 0, "log_every": 100},
        "cluster": {"num_workers": 4, "run_name": name},
        "placement": {"replan_every": replan_every, "min_gain": -1.0, "solver": "ilp", "time_limit_s": 2, "blocking": True,
                      "window": 10},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path)},
    })


def test_live_replacement_moves_experts_without_changing_the_math(tmp_path, ray_local):
    static = run(cfg(tmp_path, "static", 0))
    moving = run(cfg(tmp_path, "moving", 6))
    migrations = [d for d in moving.replacements if d["migrated"]]
    assert migrations, moving.replacements
    assert all(d["bytes_moved"] > 0 and d["solve_time_s"] > 0 for d in migrations)
    final = Placement.from_json((tmp_path / "moving" / "placement.json").read_text())
    assert final != Placement.contiguous(2, 8, 4), "experts should have moved off the contiguous layout"
    a = np.array([h["loss"] for h in static.history])
    b = np.array([h["loss"] for h in moving.history])
    np.testing.assert_allclose(b, a, rtol=1e-5)
    summary = json.loads((tmp_path / "moving" / "summary.json").read_text())
    recorded = [d for d in summary["replacements"] if d["migrated"]]
    assert len(recorded) == len(migrations)
    for d in recorded:  # each decision carries its predicted gain and the measured sends around it
        assert {"predicted_gain", "solve_time_s", "bytes_moved", "measured_sends_before", "measured_sends_after"} <= set(d)
