"""Where one training step's CPU time goes (on by default; ``--no-profile`` skips it): GEMMs,
collectives, everything else, and the top ops by self CPU time (torch.profiler)."""

from __future__ import annotations

import time

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")
COMM_MARKERS = ("alltoall", "all_reduce", "allreduce", "barrier")  # lower-case substrings of op names
PROFILE_REPEATS = 3
TOP_OPS = 6  # top non-GEMM ops kept per variant
TOP_ALL = 10  # rows of the top-ops table per variant


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
    gathers, scatters, elementwise, optimizer), plus the top non-GEMM ops."""
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
               "top_ops": [[k, round(ms, 2), n, c] for ms, k, n, c in ranked[:TOP_ALL]]}
        if best is None or rec["wall_ms"] < best["wall_ms"]:
            best = rec
    return best
