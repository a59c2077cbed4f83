"""The worker group: N named Ray actors, built all or none, called in lockstep.

Owns: actor creation (named ``moetrain/<run>/rank-<i>`` so they show up by name in the Ray
dashboard), each in its bundle of the run's placement group (:mod:`cluster.gang`: placed first,
ranks contiguous per node; the rank -> node map it yields is the run's topology and each rank is
told it), the check of ``cluster.ranks_per_node`` against that map, the torch.distributed
rendezvous between the actors, lockstep
calls with errors from many ranks grouped into one message, and tear-down. A rank that dies in
the middle of a collective would leave the others blocked inside gloo, so the first failure
kills the whole group at once and raises.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from cluster.gang import Gang, GangUnplaceable, Layout
from cluster.worker import MoERank
from moetrain.config import RunConfig
from moetrain.train.checkpointer import ResumePoint
from placement.placement import Placement

if TYPE_CHECKING:
    from cluster.elastic import MemoryState

NAMESPACE = "moetrain"


class WorkerGroupError(RuntimeError):
    """One or more ranks failed. ``ranks`` lists them; ``lost`` is True if an actor died."""

    def __init__(self, message: str, ranks: list[int], lost: bool, survivors: list[int] | None = None):
        super().__init__(message)
        self.ranks, self.lost = ranks, lost
        # Ranks whose actors were left alive (``WorkerGroup.call(keep_survivors=True)``): their
        # state can be recovered from memory; None when the whole group was killed.
        self.survivors = survivors


class WorkerGroupStartError(WorkerGroupError):
    """The group could not be built (no resources, setup error on a rank, bad resume).
    ``unplaceable``: the cluster has no room for it (or its layout contradicts the config)."""

    def __init__(self, message: str, ranks: list[int], lost: bool, unplaceable: bool = False):
        super().__init__(message, ranks, lost)
        self.unplaceable = unplaceable


PING_S = 0.3  # a live actor's spare thread answers a ping in milliseconds


class Unreachable(RuntimeError):
    """A rank that did not answer a ping while its peers' collective failed: taken as lost."""


def _is_lost(exc: BaseException) -> bool:
    return isinstance(exc, (RayActorError, Unreachable))


def actor_name(run_name: str, rank: int) -> str:
    return f"moetrain/{run_name}/rank-{rank}"


def _root_message(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
    if isinstance(exc, (ActorDiedError, RayActorError)):
        return "actor died (process killed or node lost)"
    if isinstance(exc, Unreachable):
        return f"{exc}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def group_errors(errors: dict[int, BaseException]) -> str:
    """``[Rank 0, 2]: msg`` lines, ranks with the same message grouped together."""
    by_msg: dict[str, list[int]] = {}
    for rank, exc in sorted(errors.items()):
        by_msg.setdefault(_root_message(exc), []).append(rank)
    return "\n".join(f"[Rank {', '.join(map(str, ranks))}]: {msg}" for msg, ranks in by_msg.items())


def _create_named(remote_cls, options: dict, *args, wait_s: float = 30.0):
    """Create a named actor; a just-killed actor of the same name may take a moment to release it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return remote_cls.options(**options).remote(*args)
        except ValueError as exc:
            if "already" not in str(exc) or time.monotonic() > deadline:
                raise ValueError(
                    f"actor name {options['name']!r} is taken: is another run named "
                    f"{options['name'].split('/')[1]!r} still alive? ({exc})"
                ) from None
            time.sleep(0.5)


def _check_resources(cfg: RunConfig) -> None:
    """Fail at once, with the numbers, when the cluster can never fit the group."""
    c = cfg.cluster
    total = ray.cluster_resources()
    need = {"CPU": c.num_workers * c.cpus_per_worker, "GPU": c.num_workers if c.use_gpu else 0}
    short = [f"{need[k]:g} {k} (the Ray cluster has {total.get(k, 0):g})" for k in need if need[k] > total.get(k, 0)]
    if short:
        raise WorkerGroupStartError(
            f"cannot start {c.num_workers} worker(s): they need "
            + " and ".join(short)
            + " — lower cluster.num_workers / cluster.cpus_per_worker or set cluster.use_gpu=false",
            [],
            False,
            unplaceable=True,
        )


def check_ranks_per_node(cfg: RunConfig, node_of_rank: tuple[int, ...]) -> None:
    """An explicit ``cluster.ranks_per_node`` must match where the ranks landed (one line if not)."""
    want = cfg.cluster.ranks_per_node
    counts = [node_of_rank.count(n) for n in range(max(node_of_rank) + 1)]
    if want and any(k != want for k in counts):
        raise WorkerGroupStartError(
            f"cluster.ranks_per_node ({want}) does not match the cluster: the {len(node_of_rank)} ranks landed "
            f"{'+'.join(map(str, counts))} on {len(counts)} node(s) (cluster.placement_strategy="
            f"{cfg.cluster.placement_strategy}); set cluster.ranks_per_node=0 to use the real layout",
            [],
            False,
            unplaceable=True,
        )


PlacementFor = Callable[[tuple[int, ...]], Placement]  # the rank -> node map -> the placement to start on


@dataclasses.dataclass
class WorkerGroup:
    actors: list
    cfg: RunConfig
    gang: Gang | None = None
    rank_info: list[dict] = dataclasses.field(default_factory=list)  # what each rank's setup reported
    # Where each rank sits: its bundle (gang, bundle index) and name; the layout (rank -> node).
    # A group re-formed in place (cluster.inplace) keeps its actors' bundles and names, and may
    # hold more than one gang (one per growth that needed new bundles).
    slots: list[tuple[Gang, int]] = dataclasses.field(default_factory=list)
    names: list[str] = dataclasses.field(default_factory=list)
    layout: Layout | None = None
    more_gangs: list[Gang] = dataclasses.field(default_factory=list)

    def describe_layout(self, node_of_rank: tuple[int, ...]) -> str:
        """``2 rank(s) on 1 node(s): node 0 (ip, id): ranks [0, 1]; threads per rank [1]; ...``"""
        info = self.rank_info
        nodes = sorted({(node_of_rank[i["rank"]], i["node_ip"], i["node_id"][:8]) for i in info})
        where = ", ".join(
            f"node {n} ({ip}, {nid}): ranks {[r for r, m in enumerate(node_of_rank) if m == n]}" for n, ip, nid in nodes
        )
        return (
            f"{len(info)} rank(s) on {len(nodes)} node(s): {where}; threads per rank "
            f"{sorted({i['threads'] for i in info})}; collectives on "
            f"{sorted({i['ifname'] or 'gloo' + chr(39) + 's choice' for i in info})}"
        )

    @property
    def node_of_rank(self) -> tuple[int, ...]:
        """Node of each rank (0..N-1, contiguous), as the ranks landed."""
        if self.layout is not None:
            return self.layout.node_of_rank
        return self.gang.layout.node_of_rank if self.gang else (0,) * len(self.actors)

    @classmethod
    def create(
        cls,
        cfg: RunConfig,
        placement: Placement | PlacementFor,
        *,
        resume: "ResumePoint | MemoryState | None" = None,
        place_wait_s: float | None = None,
        place_what: str = "cluster.start_timeout_s",
    ) -> "WorkerGroup":
        """Place the run's gang, then build every worker in its bundle and join them into one
        process group, or build none (the gang is removed again). ``placement`` is a Placement or
        a function of the rank -> node map that returns one (called once the gang is placed).
        ``place_wait_s`` (default ``cluster.start_timeout_s``) bounds the wait for the gang;
        ``place_what`` names that bound in the error. The check of the cluster's totals is skipped
        when ``place_wait_s`` is given (capacity may be on its way, e.g. after a node loss)."""
        c = cfg.cluster
        start_timeout_s = c.start_timeout_s
        if place_wait_s is None:
            _check_resources(cfg)
        try:
            gang = Gang.reserve(cfg, start_timeout_s if place_wait_s is None else place_wait_s, place_what)
        except GangUnplaceable as exc:
            raise WorkerGroupStartError(str(exc), [], False, unplaceable=True) from None
        try:
            check_ranks_per_node(cfg, gang.layout.node_of_rank)
            chosen = placement(gang.layout.node_of_rank) if callable(placement) else placement
        except BaseException:
            gang.remove()
            raise
        return cls._start_actors(cfg, gang, chosen, resume)

    @classmethod
    def _start_actors(
        cls, cfg: RunConfig, gang: Gang, placement: Placement, resume: "ResumePoint | MemoryState | None"
    ) -> "WorkerGroup":
        c = cfg.cluster
        start_timeout_s = c.start_timeout_s
        remote_cls = ray.remote(MoERank)
        cfg_dict = cfg.to_dict()
        actors: list = []
        try:
            for rank in range(c.num_workers):
                options = dict(
                    name=actor_name(c.run_name, rank),
                    namespace=NAMESPACE,
                    num_cpus=c.cpus_per_worker,
                    num_gpus=1 if c.use_gpu else 0,
                    max_restarts=0,
                    max_concurrency=3,  # lockstep calls + status / checkpoint waits (+ one left blocked)
                    **gang.actor_options(rank),
                )
                held = tuple(len(placement.local_experts(layer, rank)) for layer in range(placement.num_layers))
                start = resume.step if resume else 0
                actors.append(_create_named(remote_cls, options, cfg_dict, rank, c.num_workers, held, start))
            slots = [(gang, gang.layout.bundle_of_rank[r]) for r in range(c.num_workers)]
            names = [actor_name(c.run_name, r) for r in range(c.num_workers)]
            group = cls(actors, cfg, gang, slots=slots, names=names, layout=gang.layout)
            addr, port = group._get_one(actors[0].host_rendezvous.remote(c.num_workers), start_timeout_s)
            group.rank_info = group.call(
                "setup", addr, port, placement, resume, gang.layout.node_of_rank, timeout_s=start_timeout_s
            )
            group._check_landed()
            return group
        except WorkerGroupError as exc:
            cls._kill(actors)
            gang.remove()
            raise WorkerGroupStartError(
                f"could not start {c.num_workers} worker(s):\n{exc}", exc.ranks, exc.lost
            ) from None
        except (GetTimeoutError, ValueError) as exc:
            cls._kill(actors)
            gang.remove()
            raise WorkerGroupStartError(
                f"could not start {c.num_workers} worker(s) with {c.cpus_per_worker} CPU"
                f"{' + 1 GPU' if c.use_gpu else ''} each within {start_timeout_s:.0f} s: {exc}",
                [],
                False,
            ) from None

    def _check_landed(self) -> None:
        """Each actor runs on the node its bundle was placed on (what the topology says)."""
        assert self.gang is not None  # a started group has its gang
        ids = self.gang.layout.node_ids
        wrong = [i["rank"] for i in self.rank_info if i["node_id"] != ids[self.node_of_rank[i["rank"]]]]
        if wrong:
            raise ValueError(f"ranks {wrong} run on another node than their placement group bundle")

    @staticmethod
    def _get_one(ref, timeout_s: float):
        try:
            return ray.get(ref, timeout=timeout_s)
        except (RayTaskError, RayActorError) as exc:
            raise WorkerGroupError(group_errors({0: exc}), [0], isinstance(exc, RayActorError)) from None

    def call(
        self,
        method: str,
        *args,
        timeout_s: float | None = None,
        stuck_after_s: float | None = None,
        keep_survivors: bool = False,
        with_rank: bool = False,
    ) -> list[Any]:
        """Call ``method`` on every rank; results in rank order. On the first failure the whole
        group is killed (peers would block in a collective) and a grouped error is raised —
        unless ``keep_survivors`` and an actor was lost: then the live actors are left running
        (those blocked in a collective stay blocked; their second thread still answers) and the
        error names them in ``survivors``, for a recovery from memory.

        ``timeout_s``: raise ``GetTimeoutError`` after this long. ``stuck_after_s`` (the step
        watchdog): ranks still busy after this long are declared failed — the group is killed and
        a :class:`WorkerGroupError` naming them goes to the failure policy like a lost actor.
        ``with_rank``: each rank gets its rank as the first argument."""
        refs = [getattr(a, method).remote(*((i,) if with_rank else ()), *args) for i, a in enumerate(self.actors)]
        rank_of = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        pending = list(refs)
        deadline = time.monotonic() + stuck_after_s if stuck_after_s is not None else None
        while pending:
            wait_s = timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not done and deadline is not None:
                stuck = sorted(rank_of[r] for r in pending)
                self.shutdown(graceful=False)
                raise WorkerGroupError(
                    f"{method} failed:\n[Rank {', '.join(map(str, stuck))}]: still busy after {stuck_after_s:.0f} s "
                    "(stuck or stopped process; the step watchdog, cluster.step_timeout_s)",
                    stuck,
                    True,
                )
            if not done:
                raise GetTimeoutError(
                    f"{method} did not finish on ranks {[rank_of[r] for r in pending]} within {timeout_s} s"
                )
            for ref in done:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except (RayTaskError, RayActorError) as exc:
                    errors[rank_of[ref]] = exc
            if errors:
                raise self._failed(method, errors, pending, rank_of, keep_survivors)
        return [results[i] for i in range(len(self.actors))]

    def _failed(
        self, method: str, errors: dict, pending: list, rank_of: dict, keep_survivors: bool
    ) -> WorkerGroupError:
        """The error of a call that failed on some ranks: peers failing for the same reason get a
        moment to report, then everyone is stopped (or, with ``keep_survivors`` and a lost actor,
        the live ones are left for a recovery from memory). With ``keep_survivors``, ranks still
        busy after their peers failed are asked at once whether they live (their spare thread
        answers): one that does not within ``PING_S`` is lost (its node is gone before Ray's
        health check says so)."""
        if keep_survivors and pending and not any(isinstance(e, RayActorError) for e in errors.values()):
            quiet = self._quiet(sorted(rank_of[r] for r in pending))
            errors.update({r: Unreachable(f"no answer within {PING_S:g} s (process or node lost)") for r in quiet})
            pending = [ref for ref in pending if rank_of[ref] not in quiet]
        # (kept survivors are asked where they stand next: no need to wait for them here)
        wait_s = 0.0 if keep_survivors and any(_is_lost(e) for e in errors.values()) else 2.0
        more, pending = ray.wait(pending, num_returns=len(pending), timeout=wait_s) if pending else ([], [])
        for ref in more:
            try:
                ray.get(ref)
            except (RayTaskError, RayActorError) as exc:
                errors[rank_of[ref]] = exc
        lost = any(_is_lost(e) for e in errors.values())
        message = f"{method} failed:\n{group_errors(errors)}"
        if lost and keep_survivors:
            dead = sorted(r for r, e in errors.items() if _is_lost(e))
            alive = [r for r in range(len(self.actors)) if r not in dead]
            return WorkerGroupError(message, sorted(errors), lost, survivors=alive)
        self.shutdown(graceful=False)
        return WorkerGroupError(message, sorted(errors), lost)

    def _quiet(self, ranks: list[int]) -> list[int]:
        """Of ``ranks``, those whose actor does not answer a ping within ``PING_S``."""
        refs = {self.actors[r].where.remote(): r for r in ranks}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PING_S)
        ok = set()
        for ref in done:
            try:
                ray.get(ref)
                ok.add(refs[ref])
            except (RayTaskError, RayActorError):
                pass
        return [r for r in ranks if r not in ok]

    @staticmethod
    def _kill(actors: list) -> None:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass

    def shutdown(self, graceful: bool = True) -> None:
        if graceful:
            try:
                ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
            except Exception:
                pass
        self._kill(self.actors)
        self.actors = []
        for gang in [self.gang, *self.more_gangs]:
            if gang is not None:
                gang.remove()
