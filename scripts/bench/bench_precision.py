"""bf16 vs fp32 training throughput, the bf16 GEMM rate of one thread, and the useful-FLOPs
share of the bf16 step (issue #12, items 1 and the benchmark keys ``bf16_vs_fp32_tokens_per_s``
and ``model_flops_share_of_bf16_peak``).

Reusable from ``scripts/bench/bench_scale.py``::

    from scripts.bench.bench_precision import measure_precision
    result = measure_precision(overrides=[...], num_ranks=2, steps=6, reps=3)
    result.bf16_vs_fp32_tokens_per_s, result.model_flops_share_of_bf16_peak

How: ``num_ranks`` gloo processes (1 intra-op thread each, like the 1-CPU Ray actors of the
shipped configs) each build the real ``RankTrainer`` twice on the same placement, fp32 and bf16,
and alternate them: ``reps`` rounds of (``steps`` fp32 steps, ``steps`` bf16 steps) after one
warm-up step each, so machine load drifts hit both alike. Reported per precision: the median
step time over rounds (wall clock, and CPU time of the rank's main thread, which contention
from other processes inflates less; gloo's own threads are not in it). Then each rank measures
its thread's bf16 GEMM rate (best of ``GEMM_REPS`` square ``GEMM_SIZE`` matmuls, wall and CPU
time) and the useful FLOPs of one token (:func:`train_flops_per_token`).
share = useful FLOPs/s of the bf16 step / (ranks x GEMM rate), by wall clock and by CPU time.

Usage: ``python -m scripts.bench.bench_precision [--steps 6] [--reps 3] [--set key=value ...]``;
prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import results  # noqa: E402
from scripts.helpers import run_gloo  # noqa: E402

# The "tiny-ish" model of the measurements: the shipped tiny layout at width 256.
DEFAULT_OVERRIDES = ["model.dim=256", "model.n_heads=4", "model.ffn_dim=512", "model.moe.expert_ffn_dim=256"]
GEMM_SIZE = 1024
GEMM_REPS = 8
PG_TIMEOUT_S = 600
SCHEMA = results.Schema(
    "precision", "bf16 vs fp32 training throughput and the bf16 step's share of the bf16 GEMM rate (2 gloo ranks)",
    targets=(results.Target("bf16_vs_fp32_tokens_per_s", ">=", 2.5, "x", "bf16 / fp32 tokens/s (wall), same run"),
             results.Target("model_flops_share_of_bf16_peak", ">=", 0.35, "%",
                            "useful FLOP/s of the bf16 step / bf16 GEMM rate of the same threads")),
    keys=("fp32_step_s", "bf16_step_s", "bf16_vs_fp32_tokens_per_s_cpu", "bf16_gemm_gflops_1thread",
          "fp32_gemm_gflops_1thread", "load_average"))


@dataclass(frozen=True)
class PrecisionResult:
    tokens_per_step: int
    fp32_step_s: float  # median wall step time over rounds (rank 0)
    bf16_step_s: float
    fp32_step_cpu_s: float  # median thread CPU time per step
    bf16_step_cpu_s: float
    bf16_vs_fp32_tokens_per_s: float  # wall
    bf16_vs_fp32_tokens_per_s_cpu: float
    bf16_gemm_gflops_1thread: float  # wall clock
    fp32_gemm_gflops_1thread: float
    bf16_gemm_gflops_1thread_cpu: float  # thread CPU time
    fp32_gemm_gflops_1thread_cpu: float
    flops_per_token: float
    model_flops_share_of_bf16_peak: float  # wall
    model_flops_share_of_bf16_peak_cpu: float
    load_average: float


def train_flops_per_token(cfg) -> float:
    """Useful FLOPs of one trained token (forward + backward = 3 x forward): 6 x the matmul
    weights a token meets (attention QKV + output, dense FFNs, top-k routed experts, shared
    experts, router, LM head) + causal attention scores 6 x T x D per layer (QK^T and AV, half
    of the T x T pairs). Recomputation by activation checkpointing is not useful work."""
    m, moe = cfg.model, cfg.model.moe
    from moetrain.model.transformer import is_moe_block

    D, T = m.dim, cfg.data.seq_len
    per_token = 0
    for i in range(m.n_layers):
        per_token += 4 * D * D  # wqkv (3 D^2) + wo (D^2)
        if is_moe_block(m, i):
            per_token += moe.top_k * 3 * D * moe.expert_ffn_dim + moe.num_experts * D
            per_token += moe.num_shared_experts * 3 * D * moe.expert_ffn_dim
        else:
            per_token += 3 * D * m.ffn_dim
    per_token += m.vocab_size * D  # LM head
    return 6.0 * per_token + 6.0 * T * D * m.n_layers


def gemm_gflops(dtype: torch.dtype, size: int = GEMM_SIZE, reps: int = GEMM_REPS) -> tuple[float, float]:
    """Best-of-``reps`` GFLOP/s of a size^3 matmul on one intra-op thread: (by wall clock, by
    the thread's CPU time)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best_wall = best_cpu = float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        a @ b
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.thread_time() - c0)
    flops = 2.0 * size ** 3
    return flops / best_wall / 1e9, flops / best_cpu / 1e9


def _timed_steps(trainer, steps: int, barrier) -> tuple[float, float]:
    barrier()
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps


def _rank(ctx, overrides: list[str], steps: int, reps: int) -> dict:
    """One rank (``scripts.helpers.run_gloo``): the fp32 and bf16 trainers, interleaved rounds."""
    from moetrain.config import load_config
    from moetrain.train.trainer import RankTrainer

    base = [f"cluster.num_workers={ctx.world_size}", "logging.wandb=disabled", *overrides]
    trainers = {p: RankTrainer(load_config(None, base + [f"train.precision={p}"]), ctx=ctx)
                for p in ("fp32", "bf16")}
    times = {p: [] for p in trainers}
    for p, t in trainers.items():  # warm-up
        _timed_steps(t, 1, ctx.barrier)
    for _ in range(reps):
        for p, t in trainers.items():
            times[p].append(_timed_steps(t, steps, ctx.barrier))
    cfg = trainers["bf16"].cfg
    return {"times": times, "flops_per_token": train_flops_per_token(cfg),
            "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
            "gemm_bf16": gemm_gflops(torch.bfloat16), "gemm_fp32": gemm_gflops(torch.float32)}


def measure_precision(overrides: list[str] | None = None, *, num_ranks: int = 2, steps: int = 6,
                      reps: int = 3) -> PrecisionResult:
    """Interleaved fp32 / bf16 training on ``num_ranks`` gloo processes (see the module docstring)."""
    overrides = DEFAULT_OVERRIDES if overrides is None else overrides
    ranks = run_gloo(_rank, num_ranks, overrides, steps, reps, timeout_s=PG_TIMEOUT_S * 2,
                     pg_timeout_s=PG_TIMEOUT_S)
    r0 = ranks[0]
    med = {p: (statistics.median(w for w, _ in r0["times"][p]), statistics.median(c for _, c in r0["times"][p]))
           for p in ("fp32", "bf16")}
    tokens = r0["tokens_per_step"]
    gemm = statistics.median(r["gemm_bf16"][0] for r in ranks)
    gemm_cpu = statistics.median(r["gemm_bf16"][1] for r in ranks)
    useful = r0["flops_per_token"] * tokens  # per step, all ranks together
    return PrecisionResult(
        tokens_per_step=tokens, fp32_step_s=med["fp32"][0], bf16_step_s=med["bf16"][0],
        fp32_step_cpu_s=med["fp32"][1], bf16_step_cpu_s=med["bf16"][1],
        bf16_vs_fp32_tokens_per_s=med["fp32"][0] / med["bf16"][0],
        bf16_vs_fp32_tokens_per_s_cpu=med["fp32"][1] / med["bf16"][1],
        bf16_gemm_gflops_1thread=gemm, fp32_gemm_gflops_1thread=statistics.median(r["gemm_fp32"][0] for r in ranks),
        bf16_gemm_gflops_1thread_cpu=gemm_cpu,
        fp32_gemm_gflops_1thread_cpu=statistics.median(r["gemm_fp32"][1] for r in ranks),
        flops_per_token=r0["flops_per_token"],
        model_flops_share_of_bf16_peak=useful / med["bf16"][0] / 1e9 / (num_ranks * gemm),
        model_flops_share_of_bf16_peak_cpu=useful / med["bf16"][1] / 1e9 / (num_ranks * gemm_cpu),
        load_average=os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                    help=f"config overrides (default: {' '.join(DEFAULT_OVERRIDES)})")
    results.add_flag(ap)
    args = ap.parse_args(argv)
    r = measure_precision(args.overrides, num_ranks=args.ranks, steps=args.steps, reps=args.reps)
    for k, v in asdict(r).items():
        print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    print(json.dumps(asdict(r)))
    results.record(SCHEMA, asdict(r), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
