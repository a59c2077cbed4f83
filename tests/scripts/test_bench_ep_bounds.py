"""bench_ep's "why not met" figures, on hand-made inputs: the Amdahl ceiling of a balanced
speedup from two profiles, and the overlap microbenchmark's shares."""

import pytest

from scripts.bench.bench_ep.overlap_micro import summarize_overlap_micro
from scripts.bench.bench_ep.profiling import amdahl_bound
from scripts.bench.bench_ep.report import _with_bound


def _prof(gemm, comm, other, ops):
    return {"gemm": gemm, "comm": comm, "other": other, "ops": ops}


def test_amdahl_bound_counts_the_smaller_time_of_ops_both_arms_run():
    mt = _prof(100.0, 10.0, 30.0, {"aten::mm": 100.0, "c10d::alltoall_base_": 10.0, "aten::mul": 8.0,
                                   "aten::_fused_adamw_": 2.0, "aten::index_add": 20.0})
    ds = _prof(104.0, 20.0, 36.0, {"aten::mm": 104.0, "_AllToAll": 20.0, "aten::mul": 5.0,
                                   "aten::_fused_adamw_": 3.0, "aten::one_hot": 28.0})
    b = amdahl_bound(mt, ds, ds_step_ms=165.0)
    # shared = min(8, 5) + min(2, 3) = 7 (mm and the collectives are excluded, index_add / one_hot unshared)
    assert b["shared_ms"] == 7.0 and b["mt_gemm_ms"] == 100.0
    assert b["bound"] == pytest.approx(165.0 / 107.0) and b["bound_gemm_only"] == pytest.approx(1.65)


def test_with_bound_says_blocked_only_below_the_target():
    ops = {"aten::mm": 100.0, "aten::mul": 10.0}
    table = {"profile_rank0": {"mt_cap": _prof(100.0, 0.0, 10.0, ops), "ds_cap": _prof(100.0, 0.0, 10.0, ops)},
             "ds_cap": {"median_s": 0.121}}
    fig = _with_bound({"value": 1.0}, table, "mt_cap", "ds_cap", target=1.2)
    assert fig["bound"]["bound"] == pytest.approx(1.1) and "blocked" in fig["why"]
    table["ds_cap"]["median_s"] = 0.143
    assert "blocked" not in _with_bound({"value": 1.0}, table, "mt_cap", "ds_cap", target=1.2)["why"]
    assert "bound" not in _with_bound({"value": 1.0}, {}, "mt_cap", "ds_cap", target=1.2)  # not profiled


def test_overlap_micro_shares():
    # a2a 10 ms, GEMM 30 ms: both at once in 40 ms hides nothing, in 32 ms hides 80% of the transfer
    times = {"a2a": [0.010, 0.010, 0.011], "gemm": [0.030, 0.030, 0.029], "both": [0.040, 0.032, 0.032]}
    m = summarize_overlap_micro({0: {"times": times, "payload_bytes_per_rank": 8, "gemm_flops_per_rank": 1.0}}, 4)
    assert m["a2a_ms"] == pytest.approx(10.0) and m["gemm_ms"] == pytest.approx(30.0)
    assert m["both_ms"] == pytest.approx(32.0)
    assert m["hidden_share"] == pytest.approx(0.8) and m["concurrent_over_sum"] == pytest.approx(0.8)
    assert m["hidden_share_rounds"][0] == 0.0 and m["rounds"] == 3 and m["world"] == 4
