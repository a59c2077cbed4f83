"""Study 3: expert compute efficiency, in the main process: ``GroupedExperts`` forward + backward
on a dispatched batch (uneven rows per slot from a random router) vs one [N, D] x [D, F] SwiGLU
matmul chain with the same FLOPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import interleaved, median

EFF_SEED = 5
EFF_WARMUP = 3
INIT_STD = 0.02


def swiglu_flops(n_rows: int, D: int, Fh: int) -> float:
    """FLOPs of SwiGLU forward + backward over n_rows (3 GEMMs fwd, 6 bwd)."""
    return 2.0 * n_rows * D * Fh * 3 * 3


def _dispatched_counts(args, ws: int, g: torch.Generator) -> list[int]:
    """Rows per slot of rank 0's S = E / ws experts when all W ranks' tokens are routed by a
    random gate (uneven counts, as after a real dispatch)."""
    D, E, K, T = args.dim, args.experts, args.top_k, args.tokens
    logits = torch.randn(T * ws, D, generator=g) @ (torch.randn(D, E, generator=g) * args.gate_std)
    ids = logits.topk(K, dim=1).indices.flatten()
    return torch.bincount(ids, minlength=E)[:E // ws].tolist()


def expert_efficiency(args, ws: int, threads: int) -> dict:
    """Times both with ``threads`` intra-op threads (restores ``--threads-main`` after); the
    efficiency is raw time / grouped time (median, paired, best)."""
    from moetrain.model.moe.experts import GroupedExperts
    torch.set_num_threads(threads)
    D, Fh = args.dim, args.ffn
    S = args.experts // ws
    g = torch.Generator().manual_seed(EFF_SEED)
    counts = _dispatched_counts(args, ws, g)
    N = sum(counts)
    experts = GroupedExperts(list(range(S)), D, Fh, seed=0, layer_index=0, init_std=INIT_STD)
    x = torch.randn(N, D, generator=g).requires_grad_(True)
    gy = torch.randn(N, D, generator=g)
    wg = (torch.randn(Fh, D, generator=g) * INIT_STD).requires_grad_(True)
    wu = (torch.randn(Fh, D, generator=g) * INIT_STD).requires_grad_(True)
    wd = (torch.randn(D, Fh, generator=g) * INIT_STD).requires_grad_(True)

    def grouped():
        experts.zero_grad(set_to_none=True)
        x.grad = None
        experts(x, counts).backward(gy)

    def raw():
        for p in (wg, wu, wd, x):
            p.grad = None
        h = F.silu(x @ wg.t()) * (x @ wu.t())
        (h @ wd.t()).backward(gy)

    times = interleaved({"grouped": grouped, "raw": raw}, EFF_WARMUP, args.eff_iters, lambda: None)
    tg, tr = min(times["grouped"]), min(times["raw"])
    tgm, trm = median(times["grouped"]), median(times["raw"])
    torch.set_num_threads(args.threads_main)
    return {"world": ws, "threads": threads, "slots": S, "rows": N, "rows_per_slot": counts,
            "grouped_ms": tgm * 1e3, "raw_ms": trm * 1e3, "efficiency_median": trm / tgm,
            "efficiency_paired": median([r / g_ for g_, r in zip(times["grouped"], times["raw"])]),
            "efficiency_best": tr / tg, "grouped_gflops": swiglu_flops(N, D, Fh) / tgm / 1e9}
