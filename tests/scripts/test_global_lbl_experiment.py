"""End to end: scripts/experiments/global_lbl.py --quick on local Ray (2 workers, tiny data).

Runs the script as a subprocess (it starts and shuts down its own Ray under a short temp dir)
and checks the JSON line it prints last, the results file and the PNG.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from scripts.helpers import last_json_line

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/experiments/global_lbl.py"


@pytest.mark.ray
@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path):
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rglbl", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(SCRIPT), "--quick", "--steps", "12", "--out", str(out), "--ray-temp-dir", ray_tmp,
           "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = last_json_line(proc.stdout)

    assert line["experiment"] == "global_lbl"
    assert line["workers"] == 2 and line["accum"] == 2 and line["micro_batch_rows"] == 1
    assert line["single_domain_micro_frac"] == 1.0  # rows are packed per domain, 1 row per micro-batch
    assert line["domains"] == ["code", "english"]
    assert set(line["scopes"]) == {"micro", "global"}
    for scope in line["scopes"].values():
        assert set(scope["val_loss"]) == {"code", "english"}
        assert all(math.isfinite(v) for v in scope["val_loss"].values())
        assert len(scope["jsd_bits"]) == 2 and all(0.0 <= j <= 1.0 for j in scope["jsd_bits"])
        for shares in scope["topk_share"]:
            assert all(2 / 8 - 1e-9 <= s <= 1.0 + 1e-9 for s in shares.values())  # k/E .. 1
        assert all(imb >= 1.0 for imb in scope["val_load_imbalance"])
        assert scope["repro_max_abs_diff"] < 1e-3  # driver model reproduces the group's val loss
    assert "val_loss_mean" in line["global_minus_micro"]

    png = Path(line["figure"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(Path(line["results"]).read_text())
    assert results["batches"]["rows_per_micro_batch"] == 1
    assert len(results["results"]["micro"]["history"]) == 12
