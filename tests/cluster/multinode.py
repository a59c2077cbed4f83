"""A Ray cluster of several nodes on this machine for the multi-node tests (``ray.cluster_utils.Cluster``:
real raylets with distinct node ids, one address): a head with no CPUs (the driver's node holds no
ranks) and worker nodes added and removed by the tests. Its files, and the address file that
``ray.init()`` would look for, live in a test-owned folder (``RAY_TMPDIR``), so no other Ray on the
machine sees it. A session-wide local Ray started before (``ray_local``) is put back afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

import ray

from cluster.group import NAMESPACE, actor_name

# Fast node-death detection: a removed node is declared dead in ~1-2 s (Ray's default is ~15 s).
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                 "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


class MultiNode:
    def __init__(self, cpus_per_node: list[int]):
        from ray.cluster_utils import Cluster

        self._had_local = ray.is_initialized()
        if self._had_local:
            ray.shutdown()
        self._old_tmp = os.environ.get("RAY_TMPDIR")
        self.tmp = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")  # short: Ray's socket paths are length-limited
        os.environ["RAY_TMPDIR"] = self.tmp
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG})
        for cpus in cpus_per_node:
            self.add(cpus)
        ray.init(address=self.cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)

    def add(self, cpus: int):
        node = self.cluster.add_node(num_cpus=cpus, object_store_memory=80 * 2**20)
        self.cluster.wait_for_nodes()
        return node

    def kill_node_of(self, run_name: str, rank: int) -> str:
        """Kill every process of the node running ``rank`` at once (the rank's actor first: a
        worker process outlives its raylet by a moment); returns the node id."""
        actor = ray.get_actor(actor_name(run_name, rank), namespace=NAMESPACE)
        node_id, pid = ray.get(actor.run_fn.remote(_node_and_pid), timeout=60)
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)
        return node_id

    def kill_node_of_when_up(self, run_name: str, rank: int, wait_s: float) -> str:
        """Kill the node of ``rank`` as soon as its actor exists (while the group is starting)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                return self.kill_node_of(run_name, rank)
            except ValueError:  # no such actor yet
                time.sleep(0.05)
        return ""

    def close(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()
        if self._old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self._old_tmp
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._had_local:  # the session's local Ray (tests/conftest.py ray_local), fresh
            ray.init(num_cpus=6, include_dashboard=False, namespace=NAMESPACE,
                     _temp_dir=tempfile.mkdtemp(prefix="ray-mt-", dir="/tmp"), log_to_driver=False,
                     configure_logging=False)


def _node_and_pid(_trainer) -> tuple[str, int]:
    return ray.get_runtime_context().get_node_id(), os.getpid()


def pid_of(_trainer) -> int:
    return os.getpid()


def num_threads(_trainer) -> int:
    import torch

    return torch.get_num_threads()


def wait_up(run_name: str, count: int, wait_s: float = 120.0) -> None:
    """Block until ``count`` live actors of run ``run_name`` are up and warm (``MoERank.warm``: a
    growth's joiners; the run joins them at its next step boundary)."""
    deadline = time.monotonic() + wait_s
    prefix = f"moetrain/{run_name}/"
    while True:
        up = 0
        names = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)]
        for name in [n for n in names if n.startswith(prefix)]:
            try:
                ray.get(ray.get_actor(name, namespace=NAMESPACE).warm.remote(), timeout=30)  # (after the first)
                up += 1
            except Exception:  # not up yet, or a lost actor whose name is not released yet
                pass
        if up >= count:
            time.sleep(0.2)  # the run's own warm() answers reach the driver
            return
        assert time.monotonic() < deadline, f"{up} of {count} actors of run {run_name} up after {wait_s} s"
        time.sleep(0.1)


def killer(mn: MultiNode, run_name: str, at_step: int, rank: int, killed: list):
    """``on_step``: remove the node of ``rank`` the first time the driver sees ``at_step``."""
    def on_step(m):
        if m.step == at_step and not killed:
            killed.append(mn.kill_node_of(run_name, rank))
    return on_step
