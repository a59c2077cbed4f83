"""The process-group context of one rank, and the collectives the training step uses.

Owns: rank / world size / group / device, and small wrappers that are no-ops on a single rank
(so the single-process reference runs the very same code path without torch.distributed).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class NodeGroups:
    """The process groups of a group spread over several nodes with several ranks on some: this
    rank's node, and the first rank of every node (the leaders). A dense all-reduce then crosses
    the slow links once per node (:meth:`ParallelContext.all_reduce_dense`)."""

    node: Any  # this rank's node's ranks
    leaders: Any  # the first rank of each node (a non-member handle on the other ranks)
    leader: int  # global rank of this node's leader


def node_groups(node_R: tuple[int, ...], world_size: int) -> NodeGroups | None:
    """Build :class:`NodeGroups` (every rank calls this, in the same order: ``new_group`` is a
    collective), or None where a flat ring is as good: one node, or one rank per node."""
    nodes = sorted(set(node_R))
    members = {n: [r for r in range(world_size) if node_R[r] == n] for n in nodes}
    if len(nodes) < 2 or all(len(m) == 1 for m in members.values()):
        return None
    groups = {n: dist.new_group(members[n]) for n in nodes}
    leaders = dist.new_group([members[n][0] for n in nodes])
    me = node_R[dist.get_rank()]
    return NodeGroups(node=groups[me], leaders=leaders, leader=members[me][0])


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup, None = default group
    device: torch.device = torch.device("cpu")
    node_R: tuple[int, ...] = ()  # node index of each rank (contiguous per node); () = one node
    nodes: NodeGroups | None = None  # per-node groups (several nodes, several ranks on some)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM all-reduce over the group; returns ``t``. No-op on one rank."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_dense(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM over the group, topology-aware: reduced onto each node's leader, summed
        among the leaders, broadcast back on each node. Inter-node bytes: a ring over the nodes
        instead of over every rank (2 nodes x 2 ranks: 2x instead of 3x the tensor)."""
        n = self.nodes
        if n is None:
            return self.all_reduce_sum(t)
        dist.reduce(t, dst=n.leader, op=dist.ReduceOp.SUM, group=n.node)
        if self.rank == n.leader:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=n.leaders)
        dist.broadcast(t, src=n.leader, group=n.node)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)


def init_distributed(
    *,
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    timeout_s: float = 300.0,
    node_R: tuple[int, ...] = (),
    store: Any = None,
) -> ParallelContext:
    """Join the default process group: a TCP store at ``master_addr:master_port`` (rank 0 may
    pass the master ``store`` it already hosts; the others connect to it as clients).

    ``backend`` is ``gloo`` (CPU) or ``nccl`` (one GPU per rank).
    """
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    nodes = node_groups(tuple(node_R), world_size) if world_size > 1 and node_R else None
    return ParallelContext(
        rank=rank, world_size=world_size, group=None, device=device, node_R=tuple(node_R), nodes=nodes
    )
