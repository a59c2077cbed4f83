"""`moetrain plan` as a user runs it, and a run the planner says cannot fit refused before any
actor starts (one line, exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOETRAIN = [sys.executable, "-m", "cluster.cli"]


def _run(args, timeout=300, cwd=ROOT):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(MOETRAIN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_plan_prints_every_term_and_says_it_fits():
    proc = _run(["plan", "--config", "olmoe-1b-7b", "--memory-gb", "80"])
    assert proc.returncode == 0, proc.stderr
    for needle in ("6.919e9 total", "1.282e9 active", "parameters", "gradients", "optimizer", "activations",
                   "all-to-all", "runtime", "peak", "80.00 GiB per rank (--memory-gb): fits"):
        assert needle in proc.stdout, needle


def test_plan_that_does_not_fit_names_the_shortfall_and_computed_settings():
    proc = _run(["plan", "--config", "deepseek-moe-16b", "--memory-gb", "60", "--set", "train.grad_accum_steps=16"])
    assert proc.returncode == 1, proc.stderr
    assert "does NOT fit: short by" in proc.stdout
    assert "would fit with  --set train.grad_accum_steps=" in proc.stdout
    assert "would fit with  --set cluster.num_workers=16" in proc.stdout


def test_plan_without_flag_uses_this_machines_memory():
    proc = _run(["plan", "--config", "tiny"])
    assert proc.returncode == 0, proc.stderr
    assert "this machine's" in proc.stdout and "/ 2 actor(s)): fits" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["plan", "--memory-gb", "0"], "--memory-gb (0.0) must be > 0"),
    (["plan", "--set", "train.zero_stage=3"], "train.zero_stage (3) must be in [0, 2]"),
])
def test_plan_bad_input_one_line_exit_2(args, needle):
    proc = _run(args, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_run_that_cannot_fit_is_refused_before_any_actor(tmp_path):
    """A ~10e9-parameter model on the shipped data: the embedded Ray's memory resource cannot hold
    it, so `moetrain train` stops with the planner's line and exit 2; no rank ever starts."""
    proc = _run(["train", "--set", "model.dim=4096", "--set", "model.n_layers=4", "--set", "model.n_heads=32",
                 "--set", "model.moe.expert_ffn_dim=16384", "--set", "cluster.dashboard=false",
                 "--set", f"logging.out_dir={tmp_path}", "--set", "cluster.run_name=refused"], timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("moetrain: error:")]
    assert len(line) == 1 and "memory plan: a rank needs" in line[0] and "short by" in line[0] and "--set" in line[0]
    assert "rank-0" not in proc.stderr and not (tmp_path / "refused" / "summary.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_summary_carries_the_memory_plan(tmp_path):
    proc = _run(["train", "--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "cluster.dashboard=false",
                 "--set", "data.max_bytes_per_domain=300000", "--set", f"logging.out_dir={tmp_path}",
                 "--set", "cluster.run_name=planned"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "planned" / "summary.json").read_text())["memory_plan"]
    assert plan["fits"] is True and plan["params_total"] > 0 and plan["total_bytes"] > plan["runtime_bytes"]
    assert "memory plan" in proc.stderr
