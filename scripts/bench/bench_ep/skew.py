"""Routing skew (study 6): the skew directions, the calibration of a skew scale to a target
global expert load max/mean, the load figures computed from measured routing counts, and the
per-skew summary (timings and moetrain-vs-DeepSpeed speedups) of the layer and model grids.

Both systems see the same inputs and gate weights, hence choose the same experts."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .common import MIN_CAPACITY, ratios, summ

SKEW_SEED_U = 11  # the fixed input direction u shared by every layer
SKEW_SEED_Z = 101  # + layer index: that layer's expert load profile z
CALIBRATION_STEPS = 24  # bisection steps of calibrate()
CALIBRATION_FIRST_HI = 0.5  # first upper bracket of the skew scale (doubled until the target is passed)
CALIBRATION_MAX_SCALE = 1e4  # stop doubling beyond this scale


def skew_label(target: float) -> str:
    return "balanced" if target <= 0 else f"skew{target:g}"


def skew_vectors(D: int, E: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed unit direction u [D] (shared by all layers) and a per-layer load profile z [E]
    (standardised Gaussian: which experts are hot is random, not tied to the placement)."""
    u = torch.randn(D, generator=torch.Generator().manual_seed(SKEW_SEED_U))
    z = torch.randn(E, generator=torch.Generator().manual_seed(SKEW_SEED_Z + layer))
    return u / u.norm(), (z - z.mean()) / z.std()


def all_counts(local_E: torch.Tensor, ws: int) -> torch.Tensor:
    """[W, E] per-rank expert counts (every rank calls this together)."""
    parts = [torch.zeros_like(local_E) for _ in range(ws)]
    dist.all_gather(parts, local_E.contiguous())
    return torch.stack(parts).cpu()


def load_ratio(counts_RE: torch.Tensor) -> float:
    tot = counts_RE.sum(0).double()
    return float(tot.max() / tot.mean())


def calibrate(counts_of, target: float, ws: int, E: int, steps: int = CALIBRATION_STEPS):
    """Scale s >= 0 whose routing (``counts_of(s)`` -> this rank's [E] counts) gives a global
    expert load max/mean closest to ``target`` (bisection; every rank calls it together and gets
    the same answer). target <= 0: no skew (s = 0). Returns (s, [W, E] counts at s)."""
    if target <= 0:
        return 0.0, all_counts(counts_of(0.0), ws)
    c0 = all_counts(counts_of(0.0), ws)
    best = (abs(load_ratio(c0) - target), 0.0, c0)
    if load_ratio(c0) >= target:
        return 0.0, c0
    lo, hi = 0.0, CALIBRATION_FIRST_HI
    while True:
        c = all_counts(counts_of(hi), ws)
        r = load_ratio(c)
        best = min(best, (abs(r - target), hi, c), key=lambda b: b[0])
        if r >= target or hi > CALIBRATION_MAX_SCALE:
            break
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        c = all_counts(counts_of(mid), ws)
        r = load_ratio(c)
        best = min(best, (abs(r - target), mid, c), key=lambda b: b[0])
        lo, hi = (mid, hi) if r < target else (lo, mid)
    return best[1], best[2]


def routing_stats(counts_RE, placement_local: list[list[int]], T: int, K: int, cfs) -> dict:
    """Load figures from the per-rank counts [W, E]: global expert max/mean, the busiest rank's
    rows / mean (moetrain dropless computes only real rows, so its slowest rank does this many),
    DeepSpeed no-drop rows (every expert padded to the largest per-rank count, on every rank) and,
    per capacity factor, kept rows, drop share and DeepSpeed's padded rows (E*C per rank)."""
    c = torch.as_tensor(counts_RE, dtype=torch.float64)
    W, E = c.shape
    tot_E = c.sum(0)
    mean_rank_rows = T * K  # real rows per rank on average (W*T*K over W ranks)
    rank_rows = torch.stack([tot_E[idx].sum() for idx in placement_local])
    out = {"expert_max_mean": float(tot_E.max() / tot_E.mean()),
           "rank_max_mean": float(rank_rows.max() / mean_rank_rows),
           "ds_nodrop_rows_ratio": float(E * c.max() / mean_rank_rows),  # DS rows/rank over mean real rows
           "cf": {}}
    for cf in cfs:
        C = max(MIN_CAPACITY, int(math.ceil(cf * T * K / E)))
        kept_E = c.clamp(max=C).sum(0)
        mt_rows = max(float(kept_E[idx].sum()) for idx in placement_local)
        out["cf"][f"cf{cf:g}"] = {"capacity": C, "dropped_share": float(1 - kept_E.sum() / c.sum()),
                                  "mt_busiest_rank_rows_ratio": mt_rows / mean_rank_rows,
                                  "ds_rows_ratio": E * C / mean_rank_rows}
    return out


def _skew_speedups(tt: dict, cfs) -> dict:
    """moetrain over DeepSpeed: dropless vs no-drop, and at every capacity factor both the same
    capacity factor and dropless vs DeepSpeed at that factor."""
    sp = {}
    if "ds_nodrop" in tt:
        sp["dropless_vs_ds_nodrop"] = ratios(tt, "mt_dropless", "ds_nodrop")
    for c in cfs:
        if f"ds_cf{c:g}" in tt:
            sp[f"cf{c:g}_vs_ds_cf{c:g}"] = ratios(tt, f"mt_cf{c:g}", f"ds_cf{c:g}")
            sp[f"dropless_vs_ds_cf{c:g}"] = ratios(tt, "mt_dropless", f"ds_cf{c:g}")
    return sp


def skew_summary(grid: dict, args, ws: int, tokens: int, model: bool) -> dict:
    """Per skew: routing figures from the measured counts, per-variant timings, and the speedups
    of moetrain over DeepSpeed for dropless vs no-drop and for every capacity factor."""
    from placement.placement import Placement
    E, K = args.experts, args.top_k
    T_rank = max(1, args.tokens // args.seq) * args.seq if model else args.tokens
    local = [Placement.contiguous(1, E, ws).local_experts(0, r).tolist() for r in range(ws)]
    cfs = args.model_cf_list if model else args.cf_list
    t = grid["times"]
    out = {}
    for lab, info in grid["skews"].items():
        row = {"target": info["target"]}
        if model:
            row["routing_per_layer"] = [routing_stats(c, local, T_rank, K, cfs) for c in info["counts_LRE"]]
            row["scales"] = info["spec"]["scales"]
            row["maxdiff_logits_mt_dropless_vs_ds_nodrop"] = info.get("maxdiff_logits_mt_dropless_vs_ds_nodrop")
        else:
            row["routing"] = routing_stats(info["counts_RE"], local, T_rank, K, cfs)
            row["scale"] = info["scale"]
            row["dropped_pairs_rank0"] = info["dropped"]
            row.update({k: v for k, v in info.items() if k.startswith("maxdiff")})
        tt = {n.split("/", 1)[1]: v for n, v in t.items() if n.startswith(lab + "/")}
        row["times"] = {n: summ(v, tokens) for n, v in tt.items()}
        row["speedup"] = _skew_speedups(tt, cfs)
        out[lab] = row
    return out
