"""SIGINT / SIGTERM stop a run after the current step, with a final committed checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_sigterm_stops_after_the_step_with_a_final_checkpoint(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "cluster.cli", "train", "--set", "train.steps=100000", "--set", "train.log_every=1",
            "--set", "data.max_bytes_per_domain=150000", "--set", "data.vocab_size=300", "--set", "model.dim=32",
            "--set", "model.n_heads=2", "--set", "data.seq_len=32", "--set", "model.max_seq_len=32",
            "--set", "train.eval_batches=1", "--set", "logging.wandb=disabled", "--set", f"logging.out_dir={tmp_path}",
            "--set", f"checkpoint.uri={tmp_path / 'ckpt'}", "--set", "cluster.run_name=stopme"]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2], env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:  # wait until training is under way
        lines.append(line)
        if "step     3 |" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=180)
    out = "".join(lines) + rest
    assert proc.returncode == 3, out[-3000:]  # stopped early on request: documented, never 0
    assert "stopping after the current step" in out
    assert "=== moetrain run summary ===" in out and "STOPPED at step" in out
    committed = sorted((tmp_path / "ckpt" / "stopme").glob("step-*/manifest.json"))
    assert len(committed) == 1, committed  # the final checkpoint at the step where it stopped
    assert (tmp_path / "ckpt" / "stopme" / "latest").read_text().strip() == committed[0].parent.name
    summary = json.loads((tmp_path / "stopme" / "summary.json").read_text())
    assert summary["state"] == "stopped" and summary["stopped_at_step"] == int(committed[0].parent.name[5:])
