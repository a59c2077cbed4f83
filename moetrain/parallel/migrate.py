"""Expert migration: move expert weights **and** their AdamW state to a new placement.

Owns: the step-boundary exchange that lets a running job change which rank hosts which expert
without changing the math. :func:`plan_migration` (pure, identical on every rank) lists, for every
slot of the new placement, where its expert's rows come from: a slot of the same rank that
already holds the expert (a local copy, no traffic) or the old primary replica on another rank
(a transfer). :func:`migrate_experts` then sends only the experts that move, point to point: one
message per (source, destination) rank pair holding, for each moving expert, its three SwiGLU
matrices with their ``exp_avg`` and ``exp_avg_sq`` rows. No rank ever holds more than its own
slots plus the rows it sends and receives. AdamW is element-wise, so an expert's state moves with
its rows and the next step is the same as without the move. Slots per rank stay the same (the
solver keeps them fixed), so parameters and optimizer entries are updated in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.grads import expert_params
from placement.placement import Placement

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


class MigrationError(ValueError):
    pass


@dataclass(frozen=True)
class Move:
    """Expert ``expert`` of MoE layer ``layer`` goes into local slot ``dst_slot`` of ``dst_rank``,
    copied from local slot ``src_slot`` of ``src_rank`` (the same rank for a local copy)."""

    layer: int
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int

    @property
    def remote(self) -> bool:
        return self.src_rank != self.dst_rank


@dataclass(frozen=True)
class MigrationReport:
    """What one rank did in a migration."""

    bytes_sent: int
    bytes_received: int
    experts_sent: int
    experts_received: int
    seconds: float = 0.0
    bytes_sent_R: tuple[int, ...] = ()  # bytes sent to each rank (traffic by link class)


def _check(old: Placement, new: Placement) -> None:
    if (
        old.slots_per_rank != new.slots_per_rank
        or old.num_experts != new.num_experts
        or old.num_layers != new.num_layers
    ):
        raise MigrationError(f"cannot migrate {old} -> {new}: layers, experts and slots per rank must match")


def plan_migration(old: Placement, new: Placement) -> list[Move]:
    """Every slot whose expert changes, with its source (see the module doc), in a fixed order:
    layer, destination rank, destination slot. Unchanged slots are not listed."""
    _check(old, new)
    moves: list[Move] = []
    offsets = old.slot_offset_R
    for layer in range(new.num_layers):
        if (old.phy2log_LS[layer] == new.phy2log_LS[layer]).all():
            continue
        for r in range(new.num_ranks):
            old_local = [int(e) for e in old.local_experts(layer, r)]
            for j, e in enumerate(int(x) for x in new.local_experts(layer, r)):
                if j < len(old_local) and old_local[j] == e:
                    continue
                if e in old_local:
                    moves.append(Move(layer, e, r, old_local.index(e), r, j))
                    continue
                src = int(old.log2phy(layer, e)[0])
                src_rank = int(old.slot_rank_S[src])
                moves.append(Move(layer, e, src_rank, src - int(offsets[src_rank]), r, j))
    return moves


def _layer_tensors(layer, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every per-slot tensor of an MoE layer: each weight [S, ...] then its AdamW moments."""
    out = []
    for p in expert_params(layer):
        state = optimizer.state.get(p, {})
        out += [p.data] + [state[k] for k in ADAM_STATE_KEYS if k in state]
    return out


def _pack(moves: list[Move], tensors_L: list[list[torch.Tensor]]) -> torch.Tensor:
    rows = [t[m.src_slot].reshape(-1) for m in moves for t in tensors_L[m.layer]]
    return torch.cat(rows) if rows else torch.zeros(0)


def _row_numel(moves: list[Move], tensors_L: list[list[torch.Tensor]]) -> int:
    return sum(t[0].numel() for m in moves for t in tensors_L[m.layer])


def _exchange(plan: list[Move], tensors_L, rank: int, world: int, ctx: ParallelContext) -> dict:
    """Post one send per destination and one receive per source; the received buffers by source."""
    sends, recvs, reqs = {}, {}, []
    dtype = tensors_L[0][0].dtype if tensors_L and tensors_L[0] else torch.float32
    for peer in range(world):
        if peer == rank:
            continue
        incoming = [m for m in plan if m.dst_rank == rank and m.src_rank == peer]
        if incoming:
            recvs[peer] = torch.empty(_row_numel(incoming, tensors_L), dtype=dtype, device=ctx.device)
            reqs.append(dist.irecv(recvs[peer], src=peer, group=ctx.group))
    for peer in range(world):
        outgoing = [m for m in plan if m.src_rank == rank and m.dst_rank == peer and peer != rank]
        if outgoing:
            sends[peer] = _pack(outgoing, tensors_L).to(ctx.device)
            reqs.append(dist.isend(sends[peer], dst=peer, group=ctx.group))
    for req in reqs:
        assert req is not None  # every rank here is in ctx.group
        req.wait()
    sent_R = [sends[p].numel() * sends[p].element_size() if p in sends else 0 for p in range(world)]
    return {"recvs": recvs, "sent": sum(sent_R), "sent_R": sent_R}


def _apply(plan: list[Move], tensors_L, recvs: dict[int, torch.Tensor], rank: int) -> None:
    """Write local copies and received rows into this rank's slots (reads use the old values)."""
    mine = [m for m in plan if m.dst_rank == rank]
    new_rows: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in mine:  # local copies first read the old rows, before anything is overwritten
        if not m.remote:
            new_rows[(m.layer, m.dst_slot)] = [t[m.src_slot].clone() for t in tensors_L[m.layer]]
    offsets = {peer: 0 for peer in recvs}
    for m in mine:
        if m.remote:
            buf, rows = recvs[m.src_rank], []
            for t in tensors_L[m.layer]:
                n = t[0].numel()
                rows.append(buf[offsets[m.src_rank] : offsets[m.src_rank] + n].view_as(t[0]))
                offsets[m.src_rank] += n
            new_rows[(m.layer, m.dst_slot)] = rows
    for (layer, slot), rows in new_rows.items():
        for t, row in zip(tensors_L[layer], rows):
            t[slot].copy_(row)


@torch.no_grad()
def migrate_experts(
    moe_layers: list, optimizer: torch.optim.Optimizer, old: Placement, new: Placement, ctx: ParallelContext
) -> MigrationReport:
    """Move experts from ``old`` to ``new`` in place (collective: every rank calls it)."""
    t0 = time.perf_counter()
    plan = plan_migration(old, new)
    tensors_L = [_layer_tensors(layer, optimizer) for layer in moe_layers]
    recvs, sent, sent_R = {}, 0, [0] * ctx.world_size
    if ctx.distributed:
        out = _exchange(plan, tensors_L, ctx.rank, ctx.world_size, ctx)
        recvs, sent, sent_R = out["recvs"], out["sent"], out["sent_R"]
    _apply(plan, tensors_L, recvs, ctx.rank)
    for idx, layer in enumerate(moe_layers):
        layer.experts.local_experts = tuple(int(e) for e in new.local_experts(idx, ctx.rank))
    return MigrationReport(
        bytes_sent=sent,
        bytes_received=sum(b.numel() * b.element_size() for b in recvs.values()),
        experts_sent=sum(1 for m in plan if m.remote and m.src_rank == ctx.rank),
        experts_received=sum(1 for m in plan if m.remote and m.dst_rank == ctx.rank),
        seconds=time.perf_counter() - t0,
        bytes_sent_R=tuple(sent_R),
    )
