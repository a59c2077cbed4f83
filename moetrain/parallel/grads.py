"""Gradient reduction for hybrid data / expert parallelism, and the global gradient norm.

Owns: turning each rank's local gradients into exactly the gradients of the single-process
model on the global batch.

- Every rank's loss is the mean over its own tokens, so the single-process gradient of the
  global mean is the *average* over ranks.
- Dense parameters: one flat all-reduce (SUM) over all ranks, divided by the world size.
- Expert parameters: tokens from every rank reach an expert through the all-to-all, so its
  gradient is already the SUM over ranks of their local losses' gradients: divide by the world
  size. A replicated expert's replicas each saw part of the tokens: their gradients are summed
  over the replicas first (one all-reduce for the whole model, holding only the replicated
  experts' rows).
- The global norm counts dense parameters once and each logical expert once (primary replica).
"""

from __future__ import annotations

import math

import numpy as np

import torch

from moetrain.parallel.context import ParallelContext
from placement.placement import Placement

EXPERT_PARAM_NAMES = ("w_gate_SFD", "w_up_SFD", "w_down_SDF")


def _grad_or_zeros(p: torch.nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def expert_params(layer) -> list[torch.nn.Parameter]:
    return [getattr(layer.experts, n) for n in EXPERT_PARAM_NAMES]


def sync_dense_grads(params: list[torch.nn.Parameter], ctx: ParallelContext) -> None:
    grads = [_grad_or_zeros(p) for p in params]
    if not ctx.distributed or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    ctx.all_reduce_dense(flat).div_(ctx.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _replica_rows(placement: Placement, layer_idx: int, rank: int) -> tuple[list[int], list[int], int]:
    """This rank's local slots that hold a replicated expert (more than one replica), the row of
    that expert among the layer's replicated experts, and how many the layer has."""
    replicated = np.flatnonzero(placement.logcnt_LE[layer_idx] > 1)
    row_of = {int(e): i for i, e in enumerate(replicated)}
    local = placement.local_experts(layer_idx, rank)
    slots = [s for s, e in enumerate(local) if int(e) in row_of]
    return slots, [row_of[int(local[s])] for s in slots], len(replicated)


def reduce_replicas(layers: list[tuple[int, object]], placement: Placement, ctx: ParallelContext) -> None:
    """Sum each replicated expert's gradient over all its replica slots (on any rank): one
    all-reduce for every layer and matrix together, holding only the replicated experts' rows
    (an expert with one replica has nothing to sum)."""
    parts = []  # (grad, local slots, their rows, the layer's replicated experts, buffer offset, row width)
    total = 0
    for idx, layer in layers:
        slots, rows, n = _replica_rows(placement, idx, ctx.rank)
        for p in expert_params(layer):
            g = _grad_or_zeros(p)
            width = math.prod(g.shape[1:])
            parts.append((g, slots, rows, n, total, width))
            total += n * width
    if total == 0:
        return
    buf = parts[0][0].new_zeros(total)
    for g, slots, rows, n, off, width in parts:
        if slots:
            src = g.reshape(g.shape[0], width)[torch.tensor(slots, dtype=torch.long, device=g.device)]
            block = buf[off : off + n * width].view(n, width)
            block.index_add_(0, torch.tensor(rows, dtype=torch.long, device=buf.device), src.to(buf.dtype))
    ctx.all_reduce_sum(buf)
    for g, slots, rows, n, off, width in parts:
        if slots:
            block = buf[off : off + n * width].view(n, width)
            summed = block.index_select(0, torch.tensor(rows, dtype=torch.long, device=buf.device))
            at = torch.tensor(slots, dtype=torch.long, device=g.device)
            g.view(g.shape[0], width).index_copy_(0, at, summed.to(g.dtype))


def _reduce_replicas(layer, layer_idx: int, placement: Placement, ctx: ParallelContext) -> None:
    """One layer's :func:`reduce_replicas`."""
    reduce_replicas([(layer_idx, layer)], placement, ctx)


def sync_expert_grads(moe_layers: list, placement: Placement, ctx: ParallelContext) -> None:
    logcnt = placement.logcnt_LE
    reduce_replicas([(i, layer) for i, layer in enumerate(moe_layers) if (logcnt[i] > 1).any()], placement, ctx)
    for layer in moe_layers:
        for p in expert_params(layer):
            g = _grad_or_zeros(p)
            if ctx.distributed:
                g.div_(ctx.world_size)


def _primary_flags(placement: Placement, layer_idx: int, rank: int) -> list[bool]:
    local = placement.local_experts(layer_idx, rank)
    slots = placement.rank_slots(rank)
    return [bool(placement.log2phy(layer_idx, int(e))[0] == s) for e, s in zip(local, slots)]


def primary_slot_mask(placement: Placement, layer_idx: int, rank: int) -> torch.Tensor:
    """True for local slots holding the first replica of their expert, [S_local]."""
    return torch.tensor(_primary_flags(placement, layer_idx, rank), dtype=torch.bool)


def expert_grad_sq(moe_layers: list, placement: Placement, ctx: ParallelContext) -> torch.Tensor:
    """Sum of squares of the expert gradients, each logical expert once, over all ranks (collective)."""
    expert_sq = torch.zeros((), device=ctx.device)
    for idx, layer in enumerate(moe_layers):
        flags = _primary_flags(placement, idx, ctx.rank)
        # the primary slots' rows, selected by indices known on the host (a boolean mask would
        # size its output from the device: a host sync)
        rows = (
            None
            if all(flags)
            else torch.tensor([i for i, f in enumerate(flags) if f], dtype=torch.long, device=ctx.device)
        )
        for p in expert_params(layer):
            if p.grad is not None:
                g = p.grad if rows is None else p.grad.index_select(0, rows)
                expert_sq = expert_sq + g.float().pow(2).sum()
    return ctx.all_reduce_sum(expert_sq)


def global_grad_norm(
    dense: list[torch.nn.Parameter], moe_layers: list, placement: Placement, ctx: ParallelContext
) -> torch.Tensor:
    """L2 norm of the full model's gradient (dense once, each logical expert once)."""
    dense_sq = sum(
        (p.grad.float().pow(2).sum() for p in dense if p.grad is not None), torch.zeros((), device=ctx.device)
    )
    return (dense_sq + expert_grad_sq(moe_layers, placement, ctx)).sqrt()


def clip_grads_(params: list[torch.nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale all gradients by min(1, max_norm / (total_norm + 1e-6)), like clip_grad_norm_."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device))
