"""Study 5: expert parameter bytes per rank for each ``--mem-world-sizes`` (a Transformer built
for that world's contiguous placement, expert FFN ``--mem-ffn``) and the peak RSS of processes
that train it for two steps."""

from __future__ import annotations


import torch

from .adapter import attach_dispatchers
from .common import ADAMW_LR, gloo_rank_entry, model_cfg, peak_rss_mb, rss_mb

MEM_STEPS = 2


def _param_bytes(named_params) -> int:
    return sum(p.numel() * p.element_size() for _, p in named_params)


def _measure(rank: int, ws: int, args) -> dict:
    from moetrain import losses
    from moetrain.model import Transformer
    from moetrain.parallel.context import ParallelContext
    from placement.placement import Placement
    ctx = ParallelContext(rank=rank, world_size=ws)
    rss0 = rss_mb()
    cfg = model_cfg(args, 0.0)
    cfg.moe.expert_ffn_dim = args.mem_ffn
    placement = Placement.contiguous(cfg.n_layers, args.experts, ws)
    m = Transformer(cfg, seed=0, placement=placement, rank=rank)
    if ws > 1:
        attach_dispatchers(m.moe_layers(), placement, ctx, dedup=True)
    expert_bytes = _param_bytes(m.expert_parameters())
    dense_bytes = _param_bytes(m.dense_parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=ADAMW_LR, foreach=False)
    B = max(1, args.mem_tokens // args.seq)
    tok = torch.randint(0, args.vocab, (B, args.seq + 1), generator=torch.Generator().manual_seed(rank))
    for _ in range(MEM_STEPS):
        opt.zero_grad(set_to_none=True)
        logits, _ = m(tok[:, :-1])
        losses.lm_loss(logits, tok[:, 1:]).backward()
        opt.step()
    return {"expert_param_bytes": expert_bytes, "dense_param_bytes": dense_bytes,
            "rss_before_model_mb": rss0, "peak_rss_mb": peak_rss_mb()}


def mem_worker(rank: int, ws: int, port: int, args, queue, device_kind: str) -> None:
    """Process entry of one memory-study rank (CPU, gloo); puts ``(rank, figures)`` or
    ``(rank, {"error": traceback})`` on ``queue``."""
    gloo_rank_entry(rank, ws, port, queue, _measure, args)


def summarize_memory(res: dict, ws: int) -> dict:
    return {"expert_param_bytes_per_rank": res[0]["expert_param_bytes"],
            "dense_param_bytes_per_rank": res[0]["dense_param_bytes"],
            "peak_rss_mb_per_rank": [res[r]["peak_rss_mb"] for r in range(ws)],
            "rss_before_model_mb": [res[r]["rss_before_model_mb"] for r in range(ws)]}


def add_ratios_vs_world_1(memory: dict) -> None:
    """``expert_bytes_ratio_vs_1`` on every world's entry, when world 1 ran."""
    if "1" in memory:
        b1 = memory["1"]["expert_param_bytes_per_rank"]
        for m in memory.values():
            m["expert_bytes_ratio_vs_1"] = m["expert_param_bytes_per_rank"] / b1
