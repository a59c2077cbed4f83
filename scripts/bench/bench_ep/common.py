"""Pieces every study of the EP benchmark shares: timing (variants interleaved round by round,
medians, paired ratios), process figures (RSS), the moetrain configs built from the
CLI arguments, and ``RankEnv``, what one rank's studies need to know about their process."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from scripts.helpers import proc_status_kib

ADAMW_LR = 1e-4  # every variant's optimizer; the benchmark times steps, it does not train
# torch.optim.AdamW implementations (--adamw); every variant, moetrain and DeepSpeed, uses the same
ADAMW_KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
MIN_CAPACITY = 4  # DeepSpeed's min_capacity; routing_stats applies it to both systems' capacity
PRECISIONS = ("fp32", "bf16")  # --precision: the training precision of every variant of one pass


@dataclass(frozen=True)
class RankEnv:
    """One rank of a benchmark process group. ``barrier`` waits for every rank (and, on CUDA,
    for the device); ``ds_ok``: the DeepSpeed variants run."""

    rank: int
    ws: int
    args: object  # the argparse.Namespace of cli.parse_args
    ctx: object  # moetrain.parallel.context.ParallelContext
    device: torch.device
    ds_ok: bool
    barrier: Callable[[], None]


def compute_dtype(args) -> torch.dtype:
    """The compute dtype of this pass (``args.precision``: fp32, or bf16 = moetrain's mixed
    precision: autocast around the forward, fp32 master weights, router and losses in fp32)."""
    from moetrain.precision import PRECISION_DTYPES
    return PRECISION_DTYPES[args.precision]


def forward_region(args, device):
    """The autocast region every variant's forward runs in (nothing for fp32): the trainer's
    ``RankTrainer._forward`` (``moetrain.precision.autocast``); losses are computed outside it."""
    from moetrain.precision import autocast
    return autocast(compute_dtype(args), device)


def rss_mb() -> float:
    kib = proc_status_kib("VmRSS")
    return float("nan") if kib is None else kib / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summ(times: list[float], tokens: int) -> dict:
    med, best = median(times), min(times)
    return {"median_s": med, "min_s": best, "tokens_per_s": tokens / med, "tokens_per_s_best": tokens / best,
            "times_s": [round(t, 5) for t in times]}


def ratios(times: dict, fast: str, base: str) -> dict:
    """Speedup of ``fast`` over ``base``: ratio of medians, of minima, and the median of the
    per-round ratios (each round runs both back to back, so shared CPU load cancels best there)."""
    a, b = times[fast], times[base]
    return {"median": median(b) / median(a), "best": min(b) / min(a),
            "paired": median([y / x for x, y in zip(a, b)])}


def moe_cfg(args, capacity_factor: float, dedup: bool = True):
    from moetrain.config import MoEConfig
    return MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_ffn_dim=args.ffn,
                     capacity_factor=capacity_factor, dedup=dedup)


def model_cfg(args, capacity_factor: float):
    from moetrain.config import ModelConfig
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       ffn_dim=2 * args.dim, max_seq_len=args.seq, moe=moe_cfg(args, capacity_factor))


def model_tokens(args, ws: int) -> int:
    """Tokens of one whole-model step over all ranks: ``--tokens`` per rank, whole sequences."""
    return ws * max(1, args.tokens // args.seq) * args.seq


def interleaved(steps: dict, warmup: int, iters: int, barrier) -> dict[str, list[float]]:
    """Run every variant's step once per round, rotating the order; returns seconds per step
    (the slowest rank's, via barriers around each step)."""
    names = list(steps)
    times = {n: [] for n in names}
    for i in range(warmup + iters):
        rot = names[i % len(names):] + names[:i % len(names)]
        for n in rot:
            barrier()
            t0 = time.perf_counter()
            steps[n]()
            barrier()
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


GEMM_REF_MATMULS = 16  # matmuls per round of the GEMM reference (~1/4 of a default model step's FLOPs)
GEMM_REF_SEED = 4000  # + rank


def gemm_ref_step(env: RankEnv):
    """(step, FLOPs): ``GEMM_REF_MATMULS`` [tokens, D] x [D, F] matmuls in the pass's compute
    dtype (fp32 or bf16), the matrix units' rate on this rank's threads. Timed inside the model
    rounds, so it sees the same CPU load."""
    a = env.args
    g = torch.Generator().manual_seed(GEMM_REF_SEED + env.rank)
    x = torch.randn(a.tokens, a.dim, generator=g).to(env.device, compute_dtype(a))
    w = torch.randn(a.dim, a.ffn, generator=g).to(env.device, compute_dtype(a))

    def step():
        for _ in range(GEMM_REF_MATMULS):
            torch.mm(x, w)
    return step, 2.0 * a.tokens * a.dim * a.ffn * GEMM_REF_MATMULS


def train_step_fn(forward_loss, params, sync=None, adamw: str = "fused"):
    """A closure doing one training step: zero grads, ``forward_loss()``, backward, ``sync()``
    (gradient all-reduce, if any), AdamW step (``adamw``: a key of ``ADAMW_KINDS``)."""
    opt = torch.optim.AdamW(params, lr=ADAMW_LR, **ADAMW_KINDS[adamw])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward_loss()
        loss.backward()
        if sync is not None:
            sync()
        opt.step()
    return step


def legacy_names(capacity_factor: float) -> dict[str, str]:
    """The section-1/2 view (balanced routing, ``--capacity-factor``): legacy variant name ->
    its name in the skew grid."""
    from .skew import skew_label
    bal, cfn = skew_label(0.0), f"cf{capacity_factor:g}"
    return {"mt_cap": f"{bal}/mt_{cfn}", "mt_dropless": f"{bal}/mt_dropless", "ds_cap": f"{bal}/ds_{cfn}",
            "ds_nodrop": f"{bal}/ds_nodrop"}


GLOO_PG_TIMEOUT_S = 300  # process-group init and collectives of the side studies' groups


def gloo_rank_entry(rank: int, ws: int, port: int, queue, measure: Callable, *margs,
                    always_group: bool = False) -> None:
    """Body of a side study's process entry (memory, overlap): one thread, a gloo group when
    ``ws`` > 1 (or ``always_group``), then ``(rank, measure(rank, ws, *margs))`` or ``(rank, {"error": traceback})`` on
    ``queue``; the group is destroyed either way."""
    import datetime
    import os
    import traceback

    import torch.distributed as dist
    try:
        torch.set_num_threads(1)
        if ws > 1 or always_group:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=ws,
                                    timeout=datetime.timedelta(seconds=GLOO_PG_TIMEOUT_S))
        queue.put((rank, measure(rank, ws, *margs)))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

