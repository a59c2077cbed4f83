"""What a rank is wired with before (and while) it trains: the placement a run starts on, and
the dispatchers of its MoE layers for a placement (re-installed after every migration).
Imported by the trainer, the driver (a group's first placement) and the benchmarks."""

from __future__ import annotations

from moetrain.config import MoEConfig, RunConfig
from moetrain.model import count_moe_blocks
from moetrain.parallel.a2a import CommClock
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dispatcher import AllToAllDispatcher
from moetrain.parallel.hierarchical import HierarchicalDispatcher, expert_nodes, node_ranks
from moetrain.parallel.traffic import TrafficCounter
from placement.placement import Placement


def initial_placement(cfg: RunConfig) -> Placement:
    """The placement a run starts from: contiguous, round-robin, or a JSON file."""
    L, E, R = count_moe_blocks(cfg.model), cfg.model.moe.num_experts, cfg.cluster.num_workers
    spr = cfg.placement.slots_per_rank or None
    kind = cfg.placement.initial
    if kind == "contiguous":
        return Placement.contiguous(L, E, R, spr)
    if kind == "round_robin":
        return Placement.round_robin(L, E, R, spr)
    from pathlib import Path
    from moetrain.config import ConfigError

    path = Path(kind)
    if not path.is_file():
        raise ConfigError(f"placement.initial ({kind!r}) is neither contiguous, round_robin nor a placement JSON file")
    p = Placement.from_json(path.read_text())
    if (p.num_layers, p.num_experts, p.num_ranks) != (L, E, R):
        raise ConfigError(
            f"placement.initial {kind!r} is for {p.num_layers} layers x {p.num_experts} experts x "
            f"{p.num_ranks} ranks, the run has {L} x {E} x {R}"
        )
    return p


def install_dispatchers(
    moe_layers: list,
    placement: Placement,
    ctx: ParallelContext,
    moe: MoEConfig,
    *,
    traffic: TrafficCounter | None = None,
    clock: CommClock | None = None,
) -> None:
    """Wire MoE layer i of ``moe_layers`` (placement layer order) for ``placement``, as a trainer
    does at the start and after every migration: every router learns its experts' nodes
    (node-limited routing); on more than one rank every layer gets an all-to-all dispatcher —
    hierarchical (node, then rank) when ``moe.dispatch`` asks for it and the group spans several
    nodes. ``traffic`` counts the bytes sent, ``clock`` times the collectives (benchmarks)."""
    for idx, layer in enumerate(moe_layers):
        layer.router.set_expert_nodes(expert_nodes(placement, idx, ctx.node_R))
    if not ctx.distributed:
        return
    nodes = node_ranks(ctx.node_R, ctx.world_size)
    for idx, layer in enumerate(moe_layers):
        tally = traffic.layer(idx) if traffic is not None else None
        if moe.dispatch == "hierarchical" and len(nodes) > 1:
            layer.dispatcher = HierarchicalDispatcher(
                placement, idx, ctx, capacity_factor=moe.capacity_factor, clock=clock, tally=tally
            )
        else:  # flat, or hierarchical on one node (the same sends)
            layer.dispatcher = AllToAllDispatcher(
                placement,
                idx,
                ctx,
                capacity_factor=moe.capacity_factor,
                dedup=moe.dedup,
                chunks=moe.a2a_chunks,
                clock=clock,
                tally=tally,
            )
