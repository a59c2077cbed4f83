"""The run's states and outcome: what the controller's state machine moves through
(:class:`State`), its failure policy, what a run returns (:class:`RunResult`) and its
summary.json (:func:`run_summary`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster import replacement
from cluster.group import WorkerGroupError, WorkerGroupStartError
from moetrain.train.metrics import StepMetrics


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    REPLACING = "replacing"
    CHECKPOINTING = "checkpointing"
    RESIZING = "resizing"  # an elastic run changes its group size at a step boundary
    RESTARTING = "restarting"
    FINISHED = "finished"
    STOPPED = "stopped"  # a stop was requested (SIGINT/SIGTERM, `ray job stop`) before the last step
    FAILED = "failed"


TERMINAL = (State.FINISHED, State.STOPPED, State.FAILED)


class RunFailed(RuntimeError):
    """The run ended in FAILED; the message says why (grouped per rank)."""


class RunAborted(RuntimeError):
    """The driver gives up on the run (non-finite steps, checkpoints failing): not retried."""


@dataclass
class FailurePolicy:
    max_failures: int
    failures: int = 0

    def should_retry(self, exc: BaseException) -> bool:
        """Retry lost actors (and failed collectives caused by them) while budget remains, also
        an actor lost while the group starts (its node went away); not a group that cannot start."""
        if isinstance(exc, WorkerGroupStartError) and not exc.lost:
            return False
        self.failures += 1
        return isinstance(exc, WorkerGroupError) and self.failures <= self.max_failures


@dataclass
class RunResult:
    state: State
    summary: dict
    history: list[StepMetrics] = field(default_factory=list)
    replacements: list[replacement.Decision] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    restarts: int = 0
    error: str = ""
    user_error: bool = False  # refused before training (the cluster cannot hold the group): exit 2


def run_summary(c, wall_s: float, results: dict) -> dict:
    """summary.json of the run controller ``c`` (a :class:`~cluster.controller.Controller`) in
    any terminal state: how the run ended, its group and checkpoints, and ``results`` if any."""
    return {
        "run_name": c.cfg.cluster.run_name,
        "run_id": c.run_id,
        "state": c.state.value,
        "error": c.error,
        "num_workers": c.size.world,
        "num_workers_asked": c.cfg.cluster.num_workers,
        "resizes": [e.to_dict() for e in c.size.events],
        "steps": c.step,
        "stopped_at_step": c.step if c.state != State.FINISHED else None,
        "wall_s": wall_s,
        "restarts": c.restarts,
        "skipped_steps": c.nonfinite_skips,
        "checkpoints_committed": len(c.ckpt.committed),
        "checkpoints_failed": len(c.ckpt.failed),
        "checkpoint_failures": [{"step": s, "error": m} for s, m in c.ckpt.failed],
        "memory_plan": c.memory_plan,
        "node_of_rank": list(c.node_of_rank),
        "layouts": [list(x) for x in c.layouts],
        "placements_resolved_for_topology": c.resolved_for_topology,
        "ranks": [
            {k: i[k] for k in ("rank", "node_ip", "node_id", "ifname", "threads")}
            for i in (c.group.rank_info if c.group else [])
        ],
        **results,
    }
