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
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from moetrain.config import RunConfig, elastic_sizes, sized
from moetrain.train.checkpointer import ResumePoint
from placement.placement import Placement

log = logging.getLogger("moetrain")

SUSPECT_S = 30.0  # how long a node whose ranks were all lost is kept out of growths


def placement_of_size(cfg: RunConfig) -> Placement:
    """The configured initial placement for ``cfg``'s group size; contiguous when
    ``placement.initial`` is a JSON file made for another size."""
    import dataclasses

    from moetrain.config import ConfigError
    from moetrain.train.trainer import initial_placement

    try:
        return initial_placement(cfg)
    except ConfigError:
        return initial_placement(
            dataclasses.replace(cfg, placement=dataclasses.replace(cfg.placement, initial="contiguous"))
        )


def free_ranks(cfg: RunConfig, exclude: frozenset[str] = frozenset()) -> int:
    """Ranks of ``cfg.cluster``'s size (CPUs, a GPU) that fit in what the live nodes have free
    now (resources held by placement groups, ours included, are not free), leaving out the nodes
    ``exclude`` (where ranks were just lost: Ray may not have declared them dead yet)."""
    from ray._private.state import available_resources_per_node  # Ray's per-node view (no public one)

    c = cfg.cluster
    n = 0
    for node_id, avail in available_resources_per_node().items():
        if node_id in exclude:
            continue
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
    return take(group.actors, list(range(len(group.actors))), held, step, placement, run_id)


def take(actors: list, ranks: list[int], prepared: list[dict], step: int, placement: Placement, run_id: str):
    """The objects ``snapshot_prepare`` kept on ``ranks`` (its answers, ``prepared``), each as its
    own object owned by the driver, as a :class:`MemoryState` (a resize and a recovery share it)."""
    refs: dict[str, Any] = {}
    for r, h in zip(ranks, prepared):
        names = h["names"]
        if names:
            out = actors[r].snapshot_take.options(num_returns=len(names)).remote()
            refs.update(zip(names, [out] if len(names) == 1 else out))
    ray.wait(list(refs.values()), num_returns=len(refs), fetch_local=False)
    nbytes = sum(h["bytes"] for h in prepared)
    return MemoryState(step, prepared[0]["cursor"], placement, len(actors), refs, nbytes, run_id)


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
    lost_ranks: list[int] = field(default_factory=list)  # ranks of the old group that were lost
    memory_refused: str = ""  # why a loss was not recovered from memory (then: the checkpoint)

    def to_dict(self) -> dict:
        return asdict(self)


class Elastic:
    """An elastic run's group size (``cluster.min_workers`` < ``cluster.num_workers``; a fixed
    size otherwise): the size now, when to grow, and the record of each change."""

    def __init__(self, cfg: RunConfig, telemetry=None):
        c = cfg.cluster
        self.cfg, self.telemetry = cfg, telemetry
        self.world = c.num_workers  # the group's current size
        self.enabled = bool(c.min_workers) and c.min_workers < c.num_workers
        self.events: list[ResizeEvent] = []
        self.grow_to = 0  # the size the next RESIZING grows to
        self.refused = ""  # why the last loss could not be recovered from memory
        self._suspects: dict[str, float] = {}  # node id -> until when no growth uses it
        self._next_check = 0.0

    def cfg_now(self) -> RunConfig:
        """The run's config for the current size."""
        return self.cfg if self.world == self.cfg.cluster.num_workers else sized(self.cfg, self.world)

    def choose_start(self, wait_s: float) -> None:
        """Size a new group: the largest allowed size that fits in the free resources, waiting up
        to ``wait_s`` for ``cluster.min_workers`` to fit (then the smallest size: placing the group
        reports what is missing). A fixed-size run keeps its size."""
        if not self.enabled:
            return
        c = self.cfg.cluster
        deadline = time.monotonic() + wait_s
        while True:
            n = choose_size(self.cfg, free_ranks(self.cfg))
            if n is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        self.world = n if n is not None else elastic_sizes(self.cfg)[0]
        if self.world < c.num_workers:
            log.info(
                "run %s: %d of %d rank(s) fit now: starting on %d (cluster.min_workers=%d; growing when room appears)",
                c.run_name,
                self.world,
                c.num_workers,
                self.world,
                c.min_workers,
            )

    def suspect(self, nodes: set[str], for_s: float = SUSPECT_S) -> None:
        """Nodes where ranks were lost with no survivor: no growth uses them for ``for_s`` (Ray
        declares a dead node dead only after its health check; a live one is trusted again)."""
        until = time.monotonic() + for_s
        self._suspects.update({n: until for n in nodes})

    @property
    def suspects(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(n for n, until in self._suspects.items() if until > now)

    def grow_due(self, spare=lambda exclude: 0) -> bool:
        """Below its size, every ``cluster.resize_check_s`` (at a step boundary): whether the free
        resources and the group's ``spare(exclude)`` bundles (placed, holding no rank), on nodes
        not under suspicion, now hold a larger allowed size (then ``grow_to`` is set)."""
        if not self.enabled or self.world >= self.cfg.cluster.num_workers:
            return False
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.cfg.cluster.resize_check_s
        bad = self.suspects
        n = choose_size(self.cfg, self.world + spare(bad) + free_ranks(self.cfg, bad))
        if n is None or n <= self.world:
            return False
        self.grow_to = n
        return True

    def record(
        self,
        why: str,
        step: int,
        before: int,
        source: str,
        moved: tuple[Placement, Placement],
        t0: float,
        steps_lost: int = 0,
        nbytes: int = 0,
        lost_ranks: list[int] | None = None,
    ) -> ResizeEvent:
        """Log a change from ``before`` ranks to the current size (``moved``: the placements
        before and after), publish it and keep it for the summary."""
        event = ResizeEvent(
            step=step,
            why=why,
            from_ranks=before,
            to_ranks=self.world,
            source=source,
            experts_moved=experts_moved(*moved),
            bytes=nbytes,
            seconds=time.perf_counter() - t0,
            steps_lost=steps_lost,
            lost_ranks=list(lost_ranks or []),
            memory_refused=self.refused if source != f"memory://step-{step}" else "",
        )
        self.events.append(event)
        if self.telemetry is not None:
            self.telemetry.resize(event)
        log.info(
            "run %s: %s at step %d: %d -> %d rank(s) from %s, %d expert replica(s) moved, %.1f MB, %.1f s, "
            "%d step(s) redone",
            self.cfg.cluster.run_name,
            why,
            step,
            before,
            self.world,
            source,
            event.experts_moved,
            nbytes / 2**20,
            event.seconds,
            steps_lost,
        )
        return event
