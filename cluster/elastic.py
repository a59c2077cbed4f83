"""Elastic group size: how many ranks the cluster can hold now, a step boundary's state held in
the Ray object store, and the record of each resize.

Owns: :func:`free_ranks` (ranks that fit in the free resources of the live nodes),
:func:`choose_size` (the largest size the config allows within a bound), :class:`MemoryState`
(a step boundary's state as driver-owned object refs, one per checkpoint object) with
:func:`snapshot`, and :class:`ResizeEvent`.

A resize at a step boundary is a checkpoint kept in memory: every rank hands over the same
objects a checkpoint would hold (``moetrain.train.state``: dense state once, each logical expert
once with its AdamW moments), each as its own object owned by the driver (so they outlive the
ranks that made them); the group of the new size loads exactly what its placement gives each rank,
from those objects, through the same code path that resumes from a checkpoint onto another group
size. No store is read and no step is redone; the result equals the uninterrupted run's because
the model's result does not depend on the number of ranks or the placement.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import ray

from moetrain.config import RunConfig, elastic_sizes
from moetrain.train.checkpointer import ResumePoint
from placement.placement import Placement

log = logging.getLogger("moetrain")


def free_ranks(cfg: RunConfig) -> int:
    """Ranks of ``cfg.cluster``'s size (CPUs, a GPU) that fit in what the live nodes have free
    now (resources held by placement groups, ours included, are not free)."""
    from ray._private.state import available_resources_per_node  # Ray's per-node view (no public one)

    c = cfg.cluster
    n = 0
    for avail in available_resources_per_node().values():
        k = math.floor(avail.get("CPU", 0.0) / c.cpus_per_worker + 1e-9)
        if c.use_gpu:
            k = min(k, math.floor(avail.get("GPU", 0.0) + 1e-9))
        n += max(k, 0)
    return n


def choose_size(cfg: RunConfig, at_most: int) -> int | None:
    """The largest size in :func:`~moetrain.config.elastic_sizes` that is <= ``at_most``, or None."""
    fits = [n for n in elastic_sizes(cfg) if n <= at_most]
    return fits[-1] if fits else None


@dataclass(frozen=True)
class MemoryState:
    """A step boundary's state in the Ray object store: what a checkpoint of ``step`` would hold,
    as one driver-owned ref per object (``refs``), the data cursor, and the placement and group
    size that made it. A worker turns it into a :class:`ResumePoint` (:meth:`resume_point`)."""

    step: int
    cursor: dict
    placement: Placement
    world_size: int
    refs: dict[str, Any]  # object name -> ObjectRef
    nbytes: int
    run_id: str = ""

    @property
    def uri(self) -> str:
        return f"memory://step-{self.step}"

    def resume_point(self) -> ResumePoint:
        """On a rank: a resume point whose objects come from the object store."""
        refs = self.refs

        def fetch(names: list[str]) -> dict[str, dict]:
            got = ray.get([refs[n] for n in names])
            return dict(zip(names, got))

        return ResumePoint(
            uri=self.uri,
            step=self.step,
            cursor=self.cursor,
            placement=self.placement,
            world_size=self.world_size,
            run_id=self.run_id,
            fetch=fetch,
        )


def snapshot(group, step: int, placement: Placement, run_id: str = "") -> MemoryState:
    """Every rank's checkpoint objects of ``step`` as driver-owned refs (a collective under ZeRO:
    every rank is asked at once). Raises ``WorkerGroupError`` if a rank is lost meanwhile."""
    held = group.call("snapshot_prepare", step)  # per rank: {"names": [...], "bytes": int, "cursor": {...}}
    refs: dict[str, Any] = {}
    for actor, h in zip(group.actors, held):
        names = h["names"]
        if not names:
            continue
        out = actor.snapshot_take.options(num_returns=len(names)).remote()
        refs.update(zip(names, [out] if len(names) == 1 else out))
    ray.wait(list(refs.values()), num_returns=len(refs), fetch_local=False)
    return MemoryState(
        step=step,
        cursor=held[0]["cursor"],
        placement=placement,
        world_size=len(group.actors),
        refs=refs,
        nbytes=sum(h["bytes"] for h in held),
        run_id=run_id,
    )


def experts_moved(before: Placement, after: Placement) -> int:
    """Expert replicas the new group hosts on a rank that did not hold them before (rank ids kept)."""
    moved = 0
    for layer in range(after.num_layers):
        for r in range(after.num_ranks):
            had = set(before.local_experts(layer, r)) if r < before.num_ranks else set()
            moved += sum(1 for e in set(after.local_experts(layer, r)) if e not in had)
    return moved


@dataclass
class ResizeEvent:
    """One change of the group's size (a ``RESIZING`` state, or a rebuild on another size)."""

    step: int  # the step boundary it happened at (the step training continues after)
    why: str  # "grow" (capacity appeared) or "node lost" (rebuilt from a checkpoint)
    from_ranks: int
    to_ranks: int
    source: str  # "memory" or the checkpoint's URI
    experts_moved: int
    bytes: int  # state moved: the in-memory snapshot, or the checkpoint read
    seconds: float  # decision -> the new group ready to train
    steps_lost: int  # completed steps redone (0 from memory)

    def to_dict(self) -> dict:
        return asdict(self)
