"""Expert migration: move expert weights **and** their AdamW state to a new placement.

Owns: the step-boundary exchange that lets a running job change which rank hosts which expert
without changing the math. Every tensor of a slot (weight, ``exp_avg``, ``exp_avg_sq``) is
gathered per logical expert from its primary replica — one SUM all-reduce of an [E, ...] buffer
per tensor per changed layer, other ranks contributing zeros — and written into the slots the new
placement gives this rank. AdamW is element-wise, so an expert's state moves with its rows and
the next step is the same as without the move. Slots per rank must stay the same (the solver
keeps them fixed), so parameters and optimizer entries are updated in place.
"""

from __future__ import annotations

import torch

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.grads import expert_params, primary_slot_mask
from placement.placement import Placement


class MigrationError(ValueError):
    pass


def _gather_by_expert(local_SX: torch.Tensor, local_experts, primary_S: torch.Tensor, num_experts: int,
                      ctx: ParallelContext) -> torch.Tensor:
    buf = local_SX.new_zeros((num_experts,) + tuple(local_SX.shape[1:]))
    idx = torch.as_tensor(local_experts, dtype=torch.long, device=buf.device)[primary_S]
    buf.index_copy_(0, idx, local_SX[primary_S])
    return ctx.all_reduce_sum(buf)


@torch.no_grad()
def migrate_experts(moe_layers: list, optimizer: torch.optim.Optimizer, old: Placement, new: Placement,
                    ctx: ParallelContext) -> int:
    """Move experts from ``old`` to ``new`` in place; returns bytes this rank received."""
    if old.slots_per_rank != new.slots_per_rank or old.num_experts != new.num_experts \
            or old.num_layers != new.num_layers:
        raise MigrationError(f"cannot migrate {old} -> {new}: layers, experts and slots per rank must match")
    moved_bytes = 0
    for idx, layer in enumerate(moe_layers):
        if (old.phy2log_LS[idx] == new.phy2log_LS[idx]).all():
            continue
        old_local = old.local_experts(idx, ctx.rank)
        new_local = torch.as_tensor(new.local_experts(idx, ctx.rank), dtype=torch.long)
        primary = primary_slot_mask(old, idx, ctx.rank)
        changed = torch.as_tensor(old_local != new.local_experts(idx, ctx.rank))
        for p in expert_params(layer):
            tensors = [p.data]
            state = optimizer.state.get(p, {})
            tensors += [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
            for t in tensors:
                full = _gather_by_expert(t, old_local, primary.to(t.device), old.num_experts, ctx)
                t.copy_(full[new_local.to(t.device)])
                moved_bytes += int(changed.sum()) * t[0].numel() * t.element_size()
        layer.experts.local_experts = tuple(int(e) for e in new_local)
    return moved_bytes
