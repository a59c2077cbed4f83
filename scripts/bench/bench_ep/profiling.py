"""Where one training step's CPU time goes (on by default; ``--no-profile`` skips it): GEMMs,
collectives, everything else, and the top ops by self CPU time (torch.profiler)."""

from __future__ import annotations

import time

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")
COMM_MARKERS = ("alltoall", "all_reduce", "allreduce", "barrier")  # lower-case substrings of op names
PROFILE_REPEATS = 3
TOP_OPS = 6  # top non-GEMM ops kept per variant
TOP_ALL = 10  # rows of the top-ops table per variant
OPS_MIN_MS = 0.01  # ops below this self time are left out of the full per-op list ("ops")


def _category(key: str) -> str:
    if key in GEMM_OPS:
        return "gemm"
    return "comm" if any(m in key.lower() for m in COMM_MARKERS) else "other"


def _categorise(prof) -> tuple[dict, list]:
    cat = {"gemm": 0.0, "comm": 0.0, "other": 0.0}
    per_op = []
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3
        c = _category(ev.key)
        cat[c] += ms
        per_op.append((ms, ev.key, ev.count, c))
    return cat, per_op


def profile_step(step, repeats: int = PROFILE_REPEATS) -> dict:
    """Self CPU ms of one step (min over ``repeats`` profiled steps) split into GEMMs, collectives
    (all-to-all / all-reduce incl. waiting for the slowest rank) and everything else (routing,
    gathers, scatters, elementwise, optimizer), the top non-GEMM ops, and every op's self ms
    (``ops``, for ``amdahl_bound``)."""
    from torch.profiler import ProfilerActivity, profile
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = time.perf_counter() - t0
        cat, per_op = _categorise(prof)
        ranked = sorted(per_op, reverse=True)
        rec = {**{c: round(v, 2) for c, v in cat.items()}, "wall_ms": round(wall * 1e3, 1),
               "top_other": [[k, round(ms, 2), n] for ms, k, n, c in ranked if c == "other"][:TOP_OPS],
               "top_ops": [[k, round(ms, 2), n, c] for ms, k, n, c in ranked[:TOP_ALL]],
               "ops": {k: round(ms, 3) for ms, k, n, c in ranked if ms >= OPS_MIN_MS}}
        if best is None or rec["wall_ms"] < best["wall_ms"]:
            best = rec
    return best


def is_gemm_or_comm(key: str) -> bool:
    return _category(key) != "other"


def amdahl_bound(mt_prof: dict, ds_prof: dict, ds_step_ms: float) -> dict:
    """How fast moetrain could get against DeepSpeed if only its non-GEMM time could shrink:
    ``bound`` = DeepSpeed's step time / (moetrain's GEMM time + shared), shared = the sum over
    every non-GEMM, non-collective op that both arms' profiles run (same name: attention,
    norms, elementwise, optimizer, loss, ...) of the smaller of the two self times, i.e. what
    moetrain would still spend on ops DeepSpeed needs too; ``bound_gemm_only`` = DeepSpeed's
    step / moetrain's GEMM time (every non-GEMM op and every transfer free). Both are ceilings:
    GEMMs already run at the matrix units' rate and are the same rows on both sides."""
    mt_ops, ds_ops = mt_prof.get("ops", {}), ds_prof.get("ops", {})
    shared = sum(min(ms, ds_ops[k]) for k, ms in mt_ops.items() if k in ds_ops and not is_gemm_or_comm(k))
    gemm = mt_prof["gemm"]
    return {"ds_step_ms": round(ds_step_ms, 2), "mt_gemm_ms": gemm, "shared_ms": round(shared, 2),
            "mt_other_ms": mt_prof["other"], "mt_comm_ms": mt_prof["comm"],
            "bound": ds_step_ms / (gemm + shared) if gemm + shared > 0 else None,
            "bound_gemm_only": ds_step_ms / gemm if gemm > 0 else None}
