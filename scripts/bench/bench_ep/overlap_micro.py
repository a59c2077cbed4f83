"""Can this machine hide an all-to-all behind compute at all? (issue 14's overlap target)

On every rank of a fresh process group (one thread each, gloo on 127.0.0.1), interleaved round
by round with barriers around each step:

- ``a2a``: the blocking all-to-all of the layer's dispatch payload alone: ``--tokens`` * K rows
  of D + K values per rank in the pass's compute dtype (fp32 or bf16), even splits (the no-dedup
  forward dispatch of a balanced layer);
- ``gemm``: the expert forward of the rows a rank receives (T*K) alone: a SwiGLU's three
  matmuls ([T*K, D] x [D, F] twice, [T*K, F] x [F, D]);
- ``both``: the same all-to-all started asynchronously, the same GEMMs, then the wait.

``hidden_share`` = (a2a + gemm - both) / a2a (per-round medians, the slowest rank's time):
1 = the transfer is free when compute runs beside it, 0 = concurrent == sequential (no spare
CPU to move the bytes while the matmuls run), < 0 = running them together costs extra.
``concurrent_over_sum`` = both / (a2a + gemm)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .common import compute_dtype, gloo_rank_entry, median

OVERLAP_SEED = 6000  # + rank
OVERLAP_WARMUP = 2


def _timed(fn, barrier) -> float:
    barrier()
    t0 = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - t0


def overlap_rank(args, ws: int) -> dict:
    """This rank's per-round seconds of ``a2a``, ``gemm`` and ``both``."""
    dt = compute_dtype(args)
    rows, D, Fh, K = args.tokens * args.top_k, args.dim, args.ffn, args.top_k
    g = torch.Generator().manual_seed(OVERLAP_SEED + dist.get_rank())
    send = torch.randn(rows, D + K, generator=g).to(dt)
    recv = torch.empty_like(send)
    x = torch.randn(rows, D, generator=g).to(dt)
    w1, w2 = (torch.randn(D, Fh, generator=g).to(dt) * 0.02 for _ in range(2))
    w3 = torch.randn(Fh, D, generator=g).to(dt) * 0.02
    splits = [rows // ws] * (ws - 1) + [rows - rows // ws * (ws - 1)]

    def gemm():
        torch.mm(torch.nn.functional.silu(x @ w1) * (x @ w2), w3)

    def a2a():
        dist.all_to_all_single(recv, send, splits, splits)

    def both():
        work = dist.all_to_all_single(recv, send, splits, splits, async_op=True)
        gemm()
        work.wait()
    steps = {"a2a": a2a, "gemm": gemm, "both": both}
    times = {n: [] for n in steps}
    names = list(steps)
    for i in range(OVERLAP_WARMUP + args.overlap_iters):
        for n in names[i % 3:] + names[:i % 3]:
            t = _timed(steps[n], dist.barrier)
            if i >= OVERLAP_WARMUP:
                times[n].append(t)
    return {"times": times, "payload_bytes_per_rank": send.numel() * send.element_size(),
            "gemm_flops_per_rank": 2.0 * rows * D * Fh * 3}


def overlap_worker(rank: int, ws: int, port: int, args, queue, device_kind: str) -> None:
    """``run_group`` target: a process group of its own, the three steps, results on ``queue``."""
    gloo_rank_entry(rank, ws, port, queue, lambda _r, w, a: overlap_rank(a, w), args, always_group=True)


def summarize_overlap_micro(res: dict, ws: int) -> dict:
    """Rank 0's times (barriers make them the slowest rank's): medians and the shares."""
    t = res[0]["times"]
    a, g, b = (median(t[n]) for n in ("a2a", "gemm", "both"))
    return {"world": ws, "rounds": len(t["a2a"]), "a2a_ms": a * 1e3, "gemm_ms": g * 1e3, "both_ms": b * 1e3,
            "hidden_share": (a + g - b) / a if a > 0 else float("nan"),
            "concurrent_over_sum": b / (a + g),
            "hidden_share_rounds": [round((x + y - z) / x, 3) for x, y, z in zip(t["a2a"], t["gemm"], t["both"])],
            "payload_bytes_per_rank": res[0]["payload_bytes_per_rank"],
            "gemm_flops_per_rank": res[0]["gemm_flops_per_rank"]}
