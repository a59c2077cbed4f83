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
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup, None = default group
    device: torch.device = torch.device("cpu")
    node_R: tuple[int, ...] = ()  # node index of each rank (contiguous per node); () = one node

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM all-reduce over the group; returns ``t``. No-op on one rank."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
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
) -> ParallelContext:
    """Join the default process group (TCP rendezvous at ``master_addr:master_port``).

    ``backend`` is ``gloo`` (CPU) or ``nccl`` (one GPU per rank).
    """
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return ParallelContext(rank=rank, world_size=world_size, group=None, device=device, node_R=tuple(node_R))
