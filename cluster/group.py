"""The worker group: N named Ray actors, built all or none, called in lockstep.

Owns: actor creation (named ``moetrain/<run>/rank-<i>`` so they show up by name in the Ray
dashboard; resources from the config), the torch.distributed rendezvous between them, lockstep
calls with errors from many ranks grouped into one message, and tear-down. A rank that dies in
the middle of a collective would leave the others blocked inside gloo, so the first failure
kills the whole group at once and raises.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from cluster.worker import Worker
from moetrain.config import RunConfig
from moetrain.train.checkpointer import ResumePoint
from placement.placement import Placement

NAMESPACE = "moetrain"


class WorkerGroupError(RuntimeError):
    """One or more ranks failed. ``ranks`` lists them; ``lost`` is True if an actor died."""

    def __init__(self, message: str, ranks: list[int], lost: bool):
        super().__init__(message)
        self.ranks, self.lost = ranks, lost


class WorkerGroupStartError(WorkerGroupError):
    """The group could not be built (no resources, setup error on a rank, bad resume)."""


def actor_name(run_name: str, rank: int) -> str:
    return f"moetrain/{run_name}/rank-{rank}"


def _root_message(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
    if isinstance(exc, (ActorDiedError, RayActorError)):
        return "actor died (process killed or node lost)"
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
                raise ValueError(f"actor name {options['name']!r} is taken: is another run named "
                                 f"{options['name'].split('/')[1]!r} still alive? ({exc})") from None
            time.sleep(0.5)


def _check_resources(cfg: RunConfig) -> None:
    """Fail at once, with the numbers, when the cluster can never fit the group."""
    c = cfg.cluster
    total = ray.cluster_resources()
    need = {"CPU": c.num_workers * c.cpus_per_worker, "GPU": c.num_workers if c.use_gpu else 0}
    short = [f"{need[k]:g} {k} (the Ray cluster has {total.get(k, 0):g})" for k in need
             if need[k] > total.get(k, 0)]
    if short:
        raise WorkerGroupStartError(
            f"cannot start {c.num_workers} worker(s): they need " + " and ".join(short)
            + " — lower cluster.num_workers / cluster.cpus_per_worker or set cluster.use_gpu=false", [], False)


@dataclasses.dataclass
class WorkerGroup:
    actors: list
    cfg: RunConfig

    @classmethod
    def create(cls, cfg: RunConfig, placement: Placement, *, resume: ResumePoint | None = None) -> "WorkerGroup":
        """Build every worker and join them into one process group, or build none."""
        c = cfg.cluster
        start_timeout_s = c.start_timeout_s
        _check_resources(cfg)
        remote_cls = ray.remote(Worker)
        cfg_dict = cfg.to_dict()
        actors = []
        try:
            for rank in range(c.num_workers):
                options = dict(name=actor_name(c.run_name, rank), namespace=NAMESPACE, num_cpus=c.cpus_per_worker,
                               num_gpus=1 if c.use_gpu else 0, max_restarts=0, max_concurrency=2)
                actors.append(_create_named(remote_cls, options, cfg_dict, rank, c.num_workers))
            group = cls(actors, cfg)
            addr, port = group._get_one(actors[0].node_address.remote(), start_timeout_s)
            group.call("setup", addr, port, placement, resume, timeout_s=start_timeout_s)
            return group
        except WorkerGroupError as exc:
            cls._kill(actors)
            raise WorkerGroupStartError(f"could not start {c.num_workers} worker(s):\n{exc}", exc.ranks, exc.lost) from None
        except (GetTimeoutError, ValueError) as exc:
            cls._kill(actors)
            raise WorkerGroupStartError(
                f"could not start {c.num_workers} worker(s) with {c.cpus_per_worker} CPU"
                f"{' + 1 GPU' if c.use_gpu else ''} each within {start_timeout_s:.0f} s: {exc}", [], False) from None

    @staticmethod
    def _get_one(ref, timeout_s: float):
        try:
            return ray.get(ref, timeout=timeout_s)
        except (RayTaskError, RayActorError) as exc:
            raise WorkerGroupError(group_errors({0: exc}), [0], isinstance(exc, RayActorError)) from None

    def call(self, method: str, *args, timeout_s: float | None = None, stuck_after_s: float | None = None) -> list[Any]:
        """Call ``method`` on every rank; results in rank order. On the first failure the whole
        group is killed (peers would block in a collective) and a grouped error is raised.

        ``timeout_s``: raise ``GetTimeoutError`` after this long. ``stuck_after_s`` (the step
        watchdog): ranks still busy after this long are declared failed — the group is killed and
        a :class:`WorkerGroupError` naming them goes to the failure policy like a lost actor."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
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
                    "(stuck or stopped process; the step watchdog, cluster.step_timeout_s)", stuck, True)
            if not done:
                raise GetTimeoutError(f"{method} did not finish on ranks {[rank_of[r] for r in pending]} "
                                      f"within {timeout_s} s")
            for ref in done:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except (RayTaskError, RayActorError) as exc:
                    errors[rank_of[ref]] = exc
            if errors:
                # Give peers that fail for the same reason a moment to report, then stop everyone.
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0) if pending else ([], [])
                for ref in more:
                    try:
                        ray.get(ref)
                    except (RayTaskError, RayActorError) as exc:
                        errors[rank_of[ref]] = exc
                self.shutdown(graceful=False)
                lost = any(isinstance(e, RayActorError) for e in errors.values())
                raise WorkerGroupError(f"{method} failed:\n{group_errors(errors)}", sorted(errors), lost)
        return [results[i] for i in range(len(self.actors))]

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
