"""In-place resizes: a worker group re-formed from live actors — the survivors of a loss, or the
group and the actors that join it — instead of being started again.

Owns: :func:`regroup` (order the members by node, a new rendezvous, every member rebuilds its
trainer from a step boundary's state in the object store: ``MoERank.rejoin``),
:func:`spare_bundles` (bundles of the run's placement groups placed on a live node and holding no
member: where Ray re-placed a lost node's bundles once capacity came back, or a dropped
survivor's), and :class:`Growth` (new actors
started in the background, in spare bundles or a new placement group of the missing size, joined
at a later step boundary once they are up).

Why: a group built from scratch starts new actor processes (3-4 s here: a process, Python,
torch, the data); re-formed in place it keeps them, so a recovery costs the state's transfer
and a gloo rendezvous (leaving a broken group and joining a new one: ~15 ms measured), and a
growth's actor start overlaps training. The state handed over is the one a resize from scratch
loads (:class:`~cluster.elastic.MemoryState`), through the same resume path, so the result is
the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray.util.placement_group import placement_group_table

from cluster.gang import Gang, GangUnplaceable, Layout, order_ranks
from cluster.group import NAMESPACE, WorkerGroup, actor_name, check_ranks_per_node
from cluster.worker import MoERank
from moetrain.config import RunConfig

if TYPE_CHECKING:
    from cluster.elastic import MemoryState
    from placement.placement import Placement

log = logging.getLogger("moetrain")

GROW_PLACE_S = 1.0  # how long a growth waits for a placement group of the missing bundles


@dataclass
class Member:
    actor: Any
    slot: tuple[Gang, int]  # (placement group, bundle index)
    name: str
    node_id: str


def regroup(
    group: WorkerGroup,
    members: list[Member],
    cfg: RunConfig,
    placement_for: Callable[[tuple[int, ...]], "Placement"],
    state: "MemoryState",
    gangs: list[Gang] = (),  # type: ignore[assignment]
) -> WorkerGroup:
    """A group of ``members`` (live actors: ``group``'s and joiners) with ``cfg`` (sized for them)
    that continues from ``state``: ranks ordered by node as a new group's would be, the placement
    from ``placement_for`` (the rank -> node map), one new process group. ``group``'s gangs (and
    ``gangs``, a growth's) pass to the new group. Raises :class:`WorkerGroupError` (its members
    killed) when a member fails meanwhile."""
    order = order_ranks([m.node_id for m in members], ray.get_runtime_context().get_node_id())
    ranked = [members[i] for i in order.bundle_of_rank]
    layout = Layout(tuple(range(len(ranked))), order.node_of_rank, order.node_ids)
    check_ranks_per_node(cfg, layout.node_of_rank)
    new = WorkerGroup(
        [m.actor for m in ranked],
        cfg,
        group.gang,
        slots=[m.slot for m in ranked],
        names=[m.name for m in ranked],
        layout=layout,
        more_gangs=[*group.more_gangs, *gangs],
    )
    placement = placement_for(layout.node_of_rank)
    addr, port = new._get_one(new.actors[0].host_rendezvous.remote(len(ranked)), cfg.cluster.start_timeout_s)
    new.rank_info = new.call(
        "rejoin",
        cfg.to_dict(),
        addr,
        port,
        placement,
        state,
        layout.node_of_rank,
        timeout_s=cfg.cluster.start_timeout_s,
        with_rank=True,
    )
    group.actors, group.gang, group.more_gangs = [], None, []  # handed over
    return new


def members_of(group: WorkerGroup, ranks: list[int]) -> list[Member]:
    """``group``'s ranks ``ranks`` as members (their node from what each rank's setup reported)."""
    node = {i["rank"]: i["node_id"] for i in group.rank_info}
    return [Member(group.actors[r], group.slots[r], group.names[r], node[r]) for r in ranks]


def spare_bundles(group: WorkerGroup, exclude: frozenset[str] = frozenset()) -> list[tuple[Gang, int]]:
    """Bundles of ``group``'s placement groups that sit on a live node (not in ``exclude``) and
    hold no member."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")} - exclude
    used = {(g.pg.id, b) for g, b in group.slots}
    out = []
    for g in [group.gang, *group.more_gangs]:
        if g is None:
            continue
        table = placement_group_table(g.pg).get("bundles_to_node_id", {})
        out += [(g, int(b)) for b, node in sorted(table.items()) if node in alive and (g.pg.id, int(b)) not in used]
    return out


@dataclass
class Growth:
    """Actors started for a larger group, in the background; :meth:`ready` at a step boundary."""

    members: list[Member] = field(default_factory=list)
    refs: list = field(default_factory=list)  # each actor's ``warm()``: ready once it is up and warm
    gangs: list[Gang] = field(default_factory=list)  # placement groups made for them
    size: int = 0  # the group's size once they join

    @classmethod
    def start(
        cls, group: WorkerGroup, cfg: RunConfig, size: int, step: int, exclude: frozenset[str] = frozenset()
    ) -> "Growth | None":
        """Start ``size - len(group.actors)`` actors: in spare bundles first (not on the nodes
        ``exclude``), the rest in a new placement group (None, and nothing left behind, when it
        cannot be placed now)."""
        want = size - len(group.actors)
        slots = spare_bundles(group, exclude)[:want]
        gangs = []
        if len(slots) < want:
            try:
                gang = Gang.reserve(cfg, GROW_PLACE_S, "a growth", count=want - len(slots), tag=f"/grow-{step}")
            except GangUnplaceable:
                return None
            gangs.append(gang)
            slots += [(gang, b) for b in range(want - len(slots))]
        log.info(
            "run %s: room for %d rank(s): starting %d actor(s) (%d in spare bundles) to join at a step boundary",
            cfg.cluster.run_name,
            size,
            want,
            sum(1 for gang, _ in slots if gang not in gangs),
        )
        g, names = cls(gangs=gangs, size=size), _free_names(cfg.cluster.run_name, set(group.names))
        for slot in slots:
            actor, name = _start(cfg, slot, names, len(group.actors) + len(g.members), size, step)
            g.members.append(Member(actor, slot, name, ""))
            g.refs.append(actor.warm.remote())
        return g

    def ready(self) -> bool:
        """Every joiner is up (their nodes filled in). Raises ``RayError`` if one died."""
        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        if len(done) < len(self.refs):
            return False
        for m, node in zip(self.members, ray.get(self.refs)):
            m.node_id = node
        return True

    def cancel(self) -> None:
        """Kill the joiners, remove the placement groups made for them."""
        for m in self.members:
            try:
                ray.kill(m.actor, no_restart=True)
            except Exception:
                pass
        for gang in self.gangs:
            gang.remove()
        self.members, self.refs, self.gangs = [], [], []


def _free_names(run_name: str, taken: set[str]):
    """Actor names of the run not held by a member: ``rank-<k>`` for k = 0, 1, ..."""
    k = 0
    while True:
        if actor_name(run_name, k) not in taken:
            yield actor_name(run_name, k)
        k += 1


def _start(cfg: RunConfig, slot: tuple[Gang, int], names, rank: int, size: int, step: int) -> tuple[Any, str]:
    """A joiner in bundle ``slot``, named by the first of ``names`` that Ray has released (a lost
    actor's name is freed a moment after its death is known)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    c = cfg.cluster
    gang, index = slot
    options = dict(
        namespace=NAMESPACE,
        num_cpus=c.cpus_per_worker,
        num_gpus=1 if c.use_gpu else 0,
        max_restarts=0,
        max_concurrency=3,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=gang.pg, placement_group_bundle_index=index, placement_group_capture_child_tasks=False
        ),
    )
    for name in names:
        try:
            return ray.remote(MoERank).options(name=name, **options).remote(cfg.to_dict(), rank, size, (), step), name
        except ValueError as exc:  # the name is still held (by a lost actor, or another run's)
            if "already" not in str(exc):
                raise
    raise AssertionError("unreachable: names is endless")
