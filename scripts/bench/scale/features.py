"""Measurements of the #12 features, each on spawned gloo ranks running the real ``RankTrainer``:
bf16 vs fp32 tokens/s (interleaved in the same processes), the bf16 step's model-FLOPs share of the
measured bf16 GEMM rate, dense optimizer-state bytes with ZeRO-1 vs stage 0, and the largest preset
sibling that trains 3 steps on 4 ranks within 20 GB.
"""

from __future__ import annotations

import statistics
import time

from .procs import peak_rss, run_ranks

THROUGHPUT_CONFIG = "olmoe-1b-7b-mini"
GEMM_SIZE = 2048  # M = K = N of the bf16 GEMM whose rate is the peak
GEMM_SECONDS = 1.0
LARGEST_STEPS = 3
LARGEST_WORLD = 4
LARGEST_LIMIT_BYTES = 20e9  # 20 GB, all ranks together
SIBLINGS = ("olmoe-1b-7b-1b", "olmoe-1b-7b-mini", "qwen15-moe-a2.7b-mini", "mixtral-8x7b-mini", "deepseek-moe-16b-mini")


def useful_flops_per_token(cfg) -> float:
    """Model FLOPs of one trained token: 6 x the active matmul parameters (the input embedding is
    a lookup; a tied head still multiplies) + causal attention 6 x L x seq_len x D (QK^T and AV,
    forward and backward, half the positions)."""
    from moetrain.plan import count_params, vocab_size

    pc = count_params(cfg)
    m = cfg.model
    lookup = vocab_size(cfg) * m.dim if not m.tie_embeddings else 0
    matmul = pc.active - lookup - pc.norms
    return 6.0 * matmul + 6.0 * m.n_layers * cfg.data.seq_len * m.dim


def _bf16_gemm_rate() -> float:
    """FLOP/s of a bf16 GEMM on this process's threads (best of runs for GEMM_SECONDS)."""
    import torch

    a = torch.randn(GEMM_SIZE, GEMM_SIZE).bfloat16()
    b = torch.randn(GEMM_SIZE, GEMM_SIZE).bfloat16()
    a @ b
    best, t_end = 0.0, time.perf_counter() + GEMM_SECONDS
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2.0 * GEMM_SIZE ** 3 / (time.perf_counter() - t0))
    return best


def _throughput_rank(ctx, cfg_dicts: dict, reps: int, steps: int) -> dict:
    """Per precision, tokens/s of ``steps`` steps, ``reps`` interleaved repetitions; then the bf16
    GEMM rate of this rank while its peer does the same."""
    from moetrain.config import from_dict
    from moetrain.data.training import open_training_data
    from moetrain.train.trainer import RankTrainer

    trainers = {}
    for name, d in cfg_dicts.items():
        cfg = from_dict(d)
        trainers[name] = RankTrainer(cfg, ctx=ctx, dataset=open_training_data(cfg.data, cfg.train.global_batch_size))
        trainers[name].train_step()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(reps):
        for name, tr in trainers.items():
            ctx.barrier()
            t0 = time.perf_counter()
            tokens = sum(tr.train_step().tokens for _ in range(steps))
            rates[name].append(tokens / (time.perf_counter() - t0))
    ctx.barrier()
    return {"rates": rates, "gemm": _bf16_gemm_rate()}


def measure_bf16(reps: int = 5, steps: int = 3, config: str = THROUGHPUT_CONFIG, world: int = 2) -> dict:
    """bf16 / fp32 tokens/s (median of the interleaved per-repetition ratios, with the range) and
    the bf16 step's useful FLOP/s over the ranks' summed bf16 GEMM rate."""
    from moetrain.config import load_config

    cfgs = {p: load_config(config, [f"train.precision={p}", f"cluster.num_workers={world}", "train.steps=100000"])
            for p in ("fp32", "bf16")}
    out = run_ranks(_throughput_rank, world, {p: c.to_dict() for p, c in cfgs.items()}, reps, steps)
    rates = out[0]["rates"]  # every rank times the same lockstep steps
    ratios = [b / f for b, f in zip(rates["bf16"], rates["fp32"])]
    flops = useful_flops_per_token(cfgs["bf16"]) * statistics.median(rates["bf16"])
    peak = sum(o["gemm"] for o in out)
    return {"ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios)),
            "fp32_tokens_per_s": statistics.median(rates["fp32"]), "bf16_tokens_per_s": statistics.median(rates["bf16"]),
            "model_flops_per_s": flops, "bf16_gemm_flops_per_s": peak, "mfu": flops / peak}


def measure_zero(config: str = THROUGHPUT_CONFIG, world: int = 4) -> dict:
    """Dense optimizer-state bytes per rank (the largest rank), ZeRO-1 over stage 0, ``world``
    ranks (``scripts.bench.bench_zero.measure_bytes``, read from the live optimizers)."""
    from scripts.bench.bench_zero import measure_bytes

    got = measure_bytes(config, [f"train.global_batch_size={4 * world}", "train.steps=10"], world)
    per_rank = got["bytes_per_rank"]
    return {"stage0_bytes": max(per_rank[0]), "stage1_bytes": max(per_rank[1]),
            "ratio": got["ratio_vs_stage0"][1], "world": world}


def _largest_rank(ctx, cfg_dict: dict, steps: int) -> dict:
    from moetrain.config import from_dict
    from moetrain.data.training import open_training_data
    from moetrain.train.trainer import RankTrainer

    cfg = from_dict(cfg_dict)
    tr = RankTrainer(cfg, ctx=ctx, dataset=open_training_data(cfg.data, cfg.train.global_batch_size))
    done = sum(not tr.train_step().nonfinite for _ in range(steps))
    return {"steps": done, "peak_rss": peak_rss()}


def measure_largest(siblings=SIBLINGS, *, steps: int = LARGEST_STEPS, world: int = LARGEST_WORLD,
                    limit: float = LARGEST_LIMIT_BYTES) -> dict:
    """The preset sibling with the most parameters whose ``steps`` optimizer steps run on
    ``world`` ranks with their peak resident sets summing to at most ``limit`` bytes. Siblings
    the planner says exceed the limit are skipped."""
    from moetrain.config import load_config
    from moetrain.plan import count_params, plan_memory

    tried = []
    cands = sorted(((count_params(load_config(s)).total, s) for s in siblings), reverse=True)
    for total, name in cands:
        cfg = load_config(name, [f"cluster.num_workers={world}", f"train.steps={steps}"])
        planned = plan_memory(cfg, suggest=False).total_bytes * world
        if planned > limit:
            tried.append({"config": name, "params": total, "skipped": f"planned {planned / 1e9:.1f} GB"})
            continue
        out = run_ranks(_largest_rank, world, cfg.to_dict(), steps)
        used = sum(o["peak_rss"] for o in out)
        ok = used <= limit and all(o["steps"] == steps for o in out)
        tried.append({"config": name, "params": total, "peak_rss_total": used, "ok": ok})
        if ok:
            return {"params": total, "config": name, "peak_rss_total": used, "tried": tried}
    return {"params": None, "config": None, "tried": tried}
