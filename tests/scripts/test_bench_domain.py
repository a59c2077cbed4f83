"""End to end: scripts/bench/bench_domain.py --quick on local Ray (2 workers, 3 domains, a few steps).

Runs the script as a subprocess (its own Ray under a short temp dir) and checks the JSON line:
the issue's keys, the dispatcher's measured sends against the home-aware cost model on the same
tokens, identical validation losses of the two assignments, and the figure.
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
SCRIPT = ROOT / "scripts/bench/bench_domain.py"


@pytest.mark.ray
@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path):
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rbdom", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--ray-temp-dir", ray_tmp,
           "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = last_json_line(proc.stdout)

    sys.path.insert(0, str(ROOT))
    from scripts.bench.bench_domain import SCHEMA
    assert SCHEMA.problems(line) == []
    assert set(line["val_loss_delta_per_domain"]) == {"code", "english", "build", "capi"}
    # the same rows per micro-batch: the two assignments train the same model (float order aside)
    assert all(abs(d) < 1e-3 for d in line["val_loss_delta_per_domain"].values())
    # the id sample covers every measured contiguous step (3 steps x 8 rows x 64 tokens < the
    # sample), so the home-aware cost model must reproduce the dispatcher's count exactly
    for arm in ("shuffled", "domain"):
        measured = line["sends_per_token_layer"][f"{arm}_contiguous"]
        assert line["model_sends_per_token_layer"][arm]["contiguous"] == pytest.approx(measured, abs=1e-9)
    assert 1.0 <= line["rank_load_max_over_mean"] <= 2.0
    assert 0.0 <= line["bound_home_sends_per_token_layer"] <= 1.0
    assert math.isfinite(line["sends_reduction_upper_bound_vs_shuffled_ilp"])
    # 4 experts on 2 ranks: the bound is the exact optimum; with no load cap no placement beats it,
    # neither the contiguous one nor the home-aware ILP's (both modelled on the same window)
    assert line["bound_kind"] == "exact" and line["bound_status"] == ["optimal"] * 2
    unc = line["bound_uncapped_home_sends_per_token_layer"]
    assert unc <= line["bound_home_sends_per_token_layer"] + 1e-12
    assert unc <= line["model_sends_per_token_layer"]["domain"]["solved"] + 1e-12
    assert unc <= line["model_sends_per_token_layer"]["domain"]["contiguous"] + 1e-12
    for key in ("sends_reduction_domain_vs_shuffled_ilp", "sends_reduction_domain_vs_contiguous"):
        t = line["targets"][key]
        assert t["within_bound"] == (t["upper_bound"] >= float(t["target"].split()[1]))
    assert set(line["targets"]) >= {"sends_reduction_domain_vs_shuffled_ilp", "rank_load_max_over_mean"}
    assert isinstance(line["all_targets_met"], bool)
    png = Path(line["figure"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"shuffled", "domain"}


def test_mixture_entries_and_specialisation_hand_computed():
    import numpy as np

    from placement import from_topk_ids
    from scripts.bench.bench_domain import mixture_entries, specialisation

    domains = ["code=/x/code.jsonl", "english=/x/en.jsonl"]
    assert mixture_entries("even", domains) == ["code=1", "english=1"]
    assert mixture_entries("", domains) == []
    assert mixture_entries("code=3,english=1", domains) == ["code=3", "english=1"]
    # home 0 picks {0,1},{0,2}: favourite 2 of 4 experts get 3 + 1 of 4 selections (ties: any);
    # home 1 picks {2,3},{2,3}: 4 of 4
    ids = np.array([[0, 1], [0, 2], [2, 3], [2, 3]])[:, None, :]
    spec = specialisation(from_topk_ids(ids, 4, home_T=np.array([0, 0, 1, 1])), 2)
    assert spec == {"top_slots_share_per_home_rank": [0.75, 1.0], "uniform": 0.5}


def test_sends_bound_hand_computed():
    """The bound of the 4-expert case of tests/placement/test_exact_dp.py: 1/6 sends with no cap
    ({0,1} | {2,3}), 1 with the ranks' loads within 1.1 x mean ({0,2} | {1,3})."""
    import numpy as np

    from placement import Topology, from_topk_ids
    from scripts.bench.bench_domain import sends_lower_bound

    ids = np.array([[0, 1]] * 3 + [[2, 3]] * 2 + [[0, 2]])[:, None, :]
    st = from_topk_ids(ids, 4, home_T=np.array([0, 0, 0, 1, 1, 1]))
    b = sends_lower_bound(st, Topology.uniform(2, 2), 1.10, 2.0)
    assert b["kind"] == "exact" and b["status"] == ["optimal"]
    assert b["bound"] == pytest.approx(1.0) and b["best_found"] == pytest.approx(1.0)
    assert b["uncapped"] == pytest.approx(1 / 6) and b["cap_L"] == [pytest.approx(1.10)]
    # 24 experts on 4 ranks is past the exact programme's limit: the ILP's dual bound stands in
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(24, 2, replace=False) for _ in range(120)])[:, None, :]
    big = from_topk_ids(ids, 24, home_T=rng.integers(0, 4, 120))
    d = sends_lower_bound(big, Topology.uniform(4, 6), 1.5, 1.0)
    assert d["kind"] == "ilp_dual" and math.isnan(d["uncapped"])
    assert d["bound"] <= d["best_found"] + 1e-9
