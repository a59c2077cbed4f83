"""scripts/examples/driver_example.py runs end to end on an embedded local Ray and prints its results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_driver_example_runs_and_prints_results(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MOETRAIN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)  # an embedded local Ray, whatever the caller's shell says
    cmd = [sys.executable, str(REPO / "scripts/examples/driver_example.py"), "--steps", "4",
           "--out-dir", str(tmp_path / "runs"), "--run-name", "drv",
           "--set", "data.vocab_size=300", "--set", "data.max_bytes_per_domain=150000",
           "--set", "model.dim=32", "--set", "model.ffn_dim=64", "--set", "model.moe.expert_ffn_dim=32"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "=== driver example results ===" in out
    assert "state            finished (4 steps, 2 workers" in out
    for needle in ("final loss", "val loss         code:", "val loss         english:", "tokens/s",
                   "expert load      max/mean per layer: L0=", "summary.json     last_loss=",
                   "routing.npz      topk_ids"):
        assert needle in out, (needle, out)
    assert (tmp_path / "runs" / "drv" / "summary.json").exists()
    assert (tmp_path / "runs" / "drv" / "routing.npz").exists()
