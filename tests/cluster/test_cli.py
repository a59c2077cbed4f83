"""`moetrain` end to end on a real embedded local Ray, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MOETRAIN = [sys.executable, "-m", "cluster.cli"]


def _run(args, cwd, timeout=300):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}
    return subprocess.run(MOETRAIN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
@pytest.mark.slow
def test_train_on_local_ray_learns_and_writes_outputs(tmp_path):
    """A short run of the shipped default on the real corpus: validation loss falls clearly."""
    proc = _run(["train", "--set", "train.steps=40", "--set", "train.eval_every=0", "--set", "train.warmup_steps=5",
                 "--set", "cluster.run_name=clitest", "--set", f"logging.out_dir={tmp_path}",
                 "--set", "data.max_bytes_per_domain=400000", "--set", "cluster.num_workers=2"],
                cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir = tmp_path / "clitest"
    summary = json.loads((out_dir / "summary.json").read_text())
    for domain in ("code", "english"):
        assert summary["val_loss"][domain] < summary["val_start"][domain] - 1.0, summary
    assert "=== moetrain run summary ===" in proc.stderr
    assert (out_dir / "expert_load.png").stat().st_size > 1000
    assert (out_dir / "routing.npz").exists() and (out_dir / "placement.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["train", "--set", "model.moe.top_k=99"], "model.moe.top_k (99) must be <= model.moe.num_experts (8)"),
    (["train", "--config", "does-not-exist.yaml"], "config file not found"),
    (["train", "--set", "data.source=paths", "--set", "data.paths=code=/nonexistent/dir"], "/nonexistent/dir"),
    (["train", "--set", "logging.out_dir=/dev/null/runs"], "logging.out_dir ('/dev/null/runs') is not writable"),
    (["train", "--set", "cluster.address=127.0.0.1:1", "--set", "cluster.connect_timeout_s=5"],
     "cannot reach the Ray cluster at 127.0.0.1:1 within 5 s"),
    (["train", "--set", "train.beta1=2"], "train.beta1 (2.0) must be in [0, 1)"),
])
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, args, needle):
    proc = _run(args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
