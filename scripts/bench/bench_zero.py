"""Benchmark of ``train.zero_stage``: dense optimizer-state bytes per rank and step time.

    PYTHONPATH=. .venv/bin/python scripts/bench/bench_zero.py [--config tiny] [--set k=v ...]
        [--bytes-ranks 4] [--time-ranks 2] [--steps 6] [--reps 3]

- bytes: on ``--bytes-ranks`` gloo processes, one trainer per stage (0, 1, 2) takes one step;
  each rank reports the bytes of the dense AdamW state it holds, read from the live optimizer
  (stage 0: the dense parameters' ``exp_avg`` + ``exp_avg_sq``; ZeRO: DeepSpeed's slices).
  ``zero_dense_optimizer_bytes_ratio`` = max over ranks of stage 1 / stage 0 (target <= 1/N + 5%).
- time: on ``--time-ranks`` gloo processes (1 torch thread each), stages 0, 1, 2 interleaved,
  ``--reps`` rounds of ``--steps`` steps each (the first step of each trainer is not timed);
  medians and ranges of the per-step wall time.

Prints a table, then one JSON line. ``scripts/bench/bench_scale.py`` calls
:func:`zero_dense_optimizer_bytes_ratio` (and may call :func:`measure_bytes` for the per-rank
figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench import results  # noqa: E402
from scripts.bench.scale.procs import run_ranks  # noqa: E402

STAGES = (0, 1, 2)
BYTES_TARGET_SLACK = 0.05  # the target: ratio <= 1/N + 5%
SCHEMA = results.Schema(
    "zero", "train.zero_stage: dense AdamW bytes per rank (ZeRO-1 vs 0) and step time per stage",
    targets=(results.Target("zero_dense_optimizer_bytes_ratio", "<=", 0.30, "",
                            "dense optimizer bytes per rank, ZeRO-1 / ZeRO-0 (threshold 1/N + 0.05, N = bytes_ranks; "
                            "shown for N = 4)", met_key="bytes_target_met"),),
    keys=("bytes_target", "bytes_ranks", "step_time_median_s", "step_time_range_s", "time_ranks"))


def _cfg(config: str, overrides: list[str], world: int, stage: int):
    from moetrain.config import load_config

    return load_config(config, list(overrides) + [f"cluster.num_workers={world}", f"train.zero_stage={stage}",
                                                  "train.eval_every=0", "logging.wandb=disabled"])


def dense_optimizer_bytes(trainer) -> int:
    """Bytes of dense AdamW state this rank holds, from the live optimizer."""
    import torch

    if trainer.dense_zero is not None:
        return trainer.dense_zero.state_bytes()
    dense = {id(p) for p in trainer.dense_params}
    return sum(v.numel() * v.element_size() for p, st in trainer.optimizer.state.items() if id(p) in dense
               for k, v in st.items() if torch.is_tensor(v) and k != "step")


def _bytes_job(ctx, config: str, overrides: list[str]) -> dict:
    from moetrain.train.trainer import RankTrainer

    out = {}
    for stage in STAGES:
        t = RankTrainer(_cfg(config, overrides, ctx.world_size, stage), ctx=ctx)
        t.train_step()
        out[stage] = dense_optimizer_bytes(t)
    return out


def measure_bytes(config: str = "tiny", overrides: list[str] | None = None, world: int = 4) -> dict:
    """Per-rank dense optimizer bytes per stage on ``world`` gloo ranks, and the ratios."""
    ranks = run_ranks(_bytes_job, world, config, list(overrides or []))
    ratio = {s: max(r[s] / r[0] for r in ranks) for s in STAGES}
    return {"world": world, "bytes_per_rank": {s: [r[s] for r in ranks] for s in STAGES},
            "ratio_vs_stage0": ratio, "target": 1 / world + BYTES_TARGET_SLACK}


def zero_dense_optimizer_bytes_ratio(config: str = "tiny", overrides: list[str] | None = None,
                                     world: int = 4) -> float:
    """Dense optimizer bytes per rank, ZeRO-1 / stage 0, worst rank, on ``world`` ranks."""
    return measure_bytes(config, overrides, world)["ratio_vs_stage0"][1]


def _time_job(ctx, config: str, overrides: list[str], steps: int, reps: int) -> dict:
    from moetrain.train.trainer import RankTrainer

    trainers = {s: RankTrainer(_cfg(config, overrides, ctx.world_size, s), ctx=ctx) for s in STAGES}
    for t in trainers.values():
        t.train_step()  # warm-up, not timed
    times: dict[int, list[float]] = {s: [] for s in STAGES}
    for _ in range(reps):
        for s, t in trainers.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                t.train_step()
                times[s].append(time.perf_counter() - t0)
    return times


def measure_step_time(config: str = "tiny", overrides: list[str] | None = None, world: int = 2,
                      steps: int = 6, reps: int = 3) -> dict:
    ranks = run_ranks(_time_job, world, config, list(overrides or []), steps, reps)
    per_step = {s: [max(r[s][i] for r in ranks) for i in range(len(ranks[0][s]))] for s in STAGES}
    return {s: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
            for s, v in per_step.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--bytes-ranks", type=int, default=4)
    ap.add_argument("--time-ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    results.add_flag(ap)
    args = ap.parse_args(argv)
    b = measure_bytes(args.config, args.overrides, args.bytes_ranks)
    t = measure_step_time(args.config, args.overrides, args.time_ranks, args.steps, args.reps)
    print(f"dense AdamW bytes per rank on {b['world']} ranks (stage: per rank, ratio vs stage 0)")
    for s in STAGES:
        print(f"  stage {s}: {b['bytes_per_rank'][s]}  ratio {b['ratio_vs_stage0'][s]:.4f}")
    print(f"step time on {args.time_ranks} ranks, {t[0]['n']} steps per stage, interleaved (median [min, max] s)")
    for s in STAGES:
        print(f"  stage {s}: {t[s]['median_s']:.4f} [{t[s]['min_s']:.4f}, {t[s]['max_s']:.4f}]")
    ratio = b["ratio_vs_stage0"][1]
    line = {"zero_dense_optimizer_bytes_ratio": ratio, "bytes_target": b["target"],
            "bytes_target_met": ratio <= b["target"], "bytes_ranks": b["world"],
            "step_time_median_s": {f"stage{s}": t[s]["median_s"] for s in STAGES},
            "step_time_range_s": {f"stage{s}": [t[s]["min_s"], t[s]["max_s"]] for s in STAGES},
            "time_ranks": args.time_ranks}
    print(json.dumps(line))
    results.record(SCHEMA, line, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
