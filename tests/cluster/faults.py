"""Fault injection shared by the cluster tests: an ``on_step`` callback that kills one named worker
actor (no restart) the first time the driver sees a given step, as a lost node would."""

from __future__ import annotations

import ray

from cluster.group import NAMESPACE, actor_name


def killer(run_name: str, at_step: int, rank: int = 1):
    """``on_step`` for ``cluster.api.run``: kill rank ``rank`` of run ``run_name`` once, at ``at_step``."""
    state = {"killed": False}

    def on_step(m):
        if m.step == at_step and not state["killed"]:
            state["killed"] = True
            ray.kill(ray.get_actor(actor_name(run_name, rank), namespace=NAMESPACE), no_restart=True)
    return on_step


class DieAt:
    """A ``RankTrainer.fault_hook``: this rank's process is SIGKILLed when step ``step`` (1-based)
    reaches ``phase`` (computing, synced, reduced, applied) — a lost rank at a chosen point of a
    step. Install it with :func:`install_hook` through ``MoERank.run_fn``."""

    def __init__(self, phase: str, step: int):
        self.phase, self.step = phase, step

    def __call__(self, phase: str, completed: int) -> None:
        if phase == self.phase and completed + 1 == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def install_hook(trainer, hook) -> None:
    trainer.fault_hook = hook


def pid_of(_trainer) -> int:
    import os

    return os.getpid()


def fail_in(_trainer, pid: int, sleep_s: float = 0.0) -> None:
    """Raise in the process ``pid``; elsewhere sleep ``sleep_s`` (a slow peer), then return."""
    import os
    import time

    if os.getpid() == pid:
        raise ValueError("boom")
    time.sleep(sleep_s)
