"""Smoke tests of the scripts/bench/bench_ep package: a tiny run (world 2, a couple of iterations)
prints the table and one final JSON line with every section; without deepspeed installed the
benchmark stops at once with one line naming the ``bench`` extra.

DeepSpeed is included when its shared-memory comm op is already compiled in the extensions cache
(the first compile takes 30 s to minutes) or when MOETRAIN_BENCH_DS=1; otherwise the run passes
``--no-deepspeed`` with deepspeed made unimportable, so the moetrain-only path is shown not to
need it, and the DeepSpeed keys are not expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "scripts/bench/bench_ep"


def _ds_cached(ext_dir: Path) -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return any(ext_dir.glob("deepspeed_shm_comm*/*.so"))


def _without_deepspeed(env: dict, tmp_path: Path) -> dict:
    """``env`` in which ``import deepspeed`` fails as if it were not installed (in every process)."""
    stub = tmp_path / "no_deepspeed" / "deepspeed"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'deepspeed\'", name="deepspeed")\n')
    paths = [str(stub.parent), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join(paths))


def test_bench_ep_without_deepspeed_says_which_extra(tmp_path):
    env = _without_deepspeed(dict(os.environ, OMP_NUM_THREADS="1"), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.bench_ep", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout == ""  # stopped before any study ran
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "deepspeed is not installed" in err[0] and "pip install -e .[bench]" in err[0], err


def test_bench_ep_precision_flag(capsys):
    from moetrain.precision import bf16_native
    from scripts.bench.bench_ep.cli import parse_args
    assert parse_args([]).precision_list == ["fp32"]
    for bad in ("fp16", "fp32,fp32", ""):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--precision", bad])
        assert exc.value.code == 2
        assert "--precision" in capsys.readouterr().err.strip().splitlines()[-1]
    if bf16_native("cpu")[0]:
        assert parse_args(["--precision", "fp32,bf16"]).precision_list == ["fp32", "bf16"]


@pytest.mark.slow
def test_bench_ep_quick_json(tmp_path):
    ext_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR", ROOT / ".cache" / "torch_extensions"))
    with_ds = os.environ.get("MOETRAIN_BENCH_DS") == "1" or _ds_cached(ext_dir)
    cmd = [sys.executable, str(PACKAGE), "--quick", "--dim", "32", "--ffn", "64", "--experts", "4",
           "--tokens", "64", "--seq", "32", "--vocab", "128", "--layers", "1", "--heads", "2",
           "--warmup", "1", "--iters", "2", "--model-iters", "1", "--eff-iters", "2",
           "--mem-ffn", "64", "--mem-tokens", "64", "--mem-world-sizes", "1,2", "--world-sizes", "2",
           "--overlap-worlds", "2", "--overlap-iters", "2"]
    from moetrain.precision import bf16_native
    bf16 = bf16_native("cpu")[0]
    if bf16:
        cmd += ["--precision", "fp32,bf16"]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir), OMP_NUM_THREADS="1")
    if not with_ds:
        cmd.append("--no-deepspeed")
        env = _without_deepspeed(env, tmp_path)
    shm = Path("/dev/shm")
    shm_before = set(shm.glob("deepspeed_*")) if shm.is_dir() else set()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if shm.is_dir():  # DeepSpeed's CPU comm buffers of the run are released, not leaked
        assert set(shm.glob("deepspeed_*")) <= shm_before
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert "MoE layer alone" in proc.stdout and "no GPU/NCCL" in proc.stdout
    out = json.loads(lines[-1])

    from scripts.bench.bench_ep.cli import SCHEMA
    assert SCHEMA.problems(out) == []
    layer = out["layer"]["2"]
    expected = {"mt_cap", "mt_dropless"} | ({"ds_cap", "ds_nodrop"} if with_ds else set())
    assert expected <= set(layer)
    for name in expected:
        assert layer[name]["tokens_per_s"] > 0 and layer[name]["median_s"] > 0
    assert set(out["model"]["2"]) >= {"mt_cap", "mt_dropless"} | ({"ds_cap"} if with_ds else set())
    if with_ds:
        assert set(layer["speedup"]) == {"mt_cap_vs_ds_cap", "mt_dropless_vs_ds_cap", "mt_dropless_vs_ds_nodrop",
                                         "mt_chunked_vs_ds_nodrop", "mt_chunked_vs_mt_dropless"}
        # same gate, same experts, DeepSpeed's noise off: dropless moetrain == DeepSpeed without dropping
        assert layer["maxdiff_mt_dropless_vs_ds_nodrop"] < 1e-4
        assert "mt_cap_vs_ds_cap" in out["model"]["2"]["speedup"]
    for kind in ("random", "correlated"):
        row = out["dedup"]["2"][kind]
        assert row["dedup"]["units_off_rank"] <= row["nodedup"]["units_off_rank"]
        assert row["dedup"]["bytes_step"] > 0 and row["nodedup"]["median_s"] > 0
    # correlated pairs are co-located: dedup must save more than on random routing
    assert out["dedup"]["2"]["correlated"]["bytes_ratio"] < out["dedup"]["2"]["random"]["bytes_ratio"]
    eff = out["expert_efficiency"][0]
    assert eff["rows"] > 0 and eff["efficiency_median"] > 0
    mem = out["memory"]
    assert mem["2"]["expert_param_bytes_per_rank"] * 2 == mem["1"]["expert_param_bytes_per_rank"]
    assert all(x > 0 for x in mem["2"]["peak_rss_mb_per_rank"])
    if not out["cuda_available"]:
        assert out["gpu"] is None
    # routing skew study: balanced + skew 1.5, calibrated from the actual routing
    assert "Routing skew" in proc.stdout
    for scope in ("layer", "model"):
        byskew = out["skew"][scope]["2"]
        assert set(byskew) == {"balanced", "skew1.5"}
        rs = byskew["skew1.5"]["routing_per_layer" if scope == "model" else "routing"]
        for r in (rs if scope == "model" else [rs]):
            assert abs(r["expert_max_mean"] - 1.5) < 0.15, r
            assert r["ds_nodrop_rows_ratio"] >= r["rank_max_mean"] - 1e-9  # DS pads, moetrain does not
        assert {"mt_dropless", "mt_cf1"} <= set(byskew["skew1.5"]["times"])
        if with_ds:
            assert "dropless_vs_ds_nodrop" in byskew["skew1.5"]["speedup"]
            for lab in ("balanced", "skew1.5"):  # same experts chosen by both systems
                md = byskew[lab].get("maxdiff_mt_dropless_vs_ds_nodrop",
                                     byskew[lab].get("maxdiff_logits_mt_dropless_vs_ds_nodrop"))
                assert md is not None and md < 1e-4
    hl = out["headline"]
    assert "target_met" in out and "balanced_parity_paired" in out
    if with_ds:
        assert hl["config"] and out["speedup_vs_deepspeed"] > 0
        assert out["target_met"] == (out["speedup_vs_deepspeed"] >= 1.3)
    _check_issue14(out, proc.stdout, with_ds)
    if bf16:
        _check_bf16(out, proc.stdout, with_ds)


def _check_bf16(out: dict, stdout: str, with_ds: bool) -> None:
    """The bf16 pass: its own sections and issue-14 figures, its keys suffixed ``_bf16``."""
    assert "======== precision bf16" in stdout and "Issue 14 figures, bf16" in stdout
    sec = out["precision"]["bf16"]
    assert sec["layer"]["2"]["mt_dropless"]["median_s"] > 0 and "dedup" not in sec
    assert out["precision"]["fp32"]["issue14"] == out["issue14"]
    for k, fig in sec["issue14"].items():
        assert out[f"{k}_bf16"] == fig["value"]
    fs = sec["model"]["2"]["flops_share_of_gemm"]
    assert fs["share_paired"] == out["model_flops_share_of_gemm_peak_bf16"] > 0
    if with_ds:  # same routing; bf16 rounding apart (the fp32 pass is exact to 1e-4)
        assert sec["layer"]["2"]["maxdiff_mt_dropless_vs_ds_nodrop"] < 0.1


def _check_issue14(out: dict, stdout: str, with_ds: bool) -> None:
    """Profile tables, the chunked overlap variant, the FLOPs share and issue 14's keys."""
    assert "-- profile layer world 2 mt_chunked" in stdout and "-- profile model world 2 mt_dropless" in stdout
    top = out["layer"]["2"]["profile_rank0"]["mt_dropless"]["top_ops"]
    assert top and any(cat == "gemm" for _, _, _, cat in top)
    assert out["layer"]["2"]["mt_chunked"]["median_s"] > 0
    ov = out["overlap"]["2"]
    assert ov["chunks"] == 2 and ov["hidden_share"] <= 1 and min(ov["blocked_ms_unchunked_per_rank"]) > 0
    fs = out["model"]["2"]["flops_share_of_gemm"]
    assert 0 < fs["share_paired"] == out["model_flops_share_of_gemm_peak"]
    keys = ("balanced_layer_speedup_vs_ds_cap", "balanced_layer_dropless_vs_ds_nodrop", "balanced_model_speedup_vs_ds",
            "skewed_layer_speedup_vs_ds", "skewed_model_speedup_vs_ds", "model_flops_share_of_gemm_peak",
            "overlap_hidden_comm_share")
    micro = out["overlap_micro"]["2"]
    assert micro["a2a_ms"] > 0 and micro["gemm_ms"] > 0 and micro["both_ms"] > 0 and micro["rounds"] == 2
    assert out["issue14"]["overlap_hidden_comm_share"]["micro"]["2"] == micro
    assert "world 2: all-to-all alone" in out["issue14"]["overlap_hidden_comm_share"]["why"]
    if with_ds:  # the Amdahl ceiling of every balanced speedup, from the same run's profiles
        for k in keys[:3]:
            b = out["issue14"][k]["bound"]
            assert b["bound_gemm_only"] >= b["bound"] > 0 and "ceiling" in out["issue14"][k]["why"]
    for k in keys:
        fig = out["issue14"][k]
        assert k in out and fig["target"] > 0 and fig["met"] == (fig["value"] is not None and fig["value"] >= fig["target"])
        if with_ds or not k.endswith(("_ds", "_ds_cap", "_ds_nodrop")):
            assert out[k] == fig["value"] is not None, (k, fig)
            assert k == "overlap_hidden_comm_share" or fig["value"] > 0, (k, fig)  # overlap may be < 0 under load
