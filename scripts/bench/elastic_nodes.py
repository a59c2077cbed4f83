"""The two-node clusters of scripts/bench/bench_elastic.py: nodes killed and brought back by the
failure schedule.

- :class:`NetNodes` (the default where network namespaces work, ``--cluster netns``): a netcluster
  (scripts/tools/netcluster.py: Ray nodes in their own network namespaces, real addresses and
  links); the head ``n0`` (the driver's node: ranks 0 and 1) and ``n1`` (ranks 2 and 3), 2 CPUs
  each. A kill ends every process of ``n1``'s namespace at once; bringing it back starts a new
  raylet there, on the same address.
- :class:`LocalNodes` (``--cluster local``): ``ray.cluster_utils.Cluster`` on this machine: a head
  with no CPUs and two worker nodes of 2 CPUs; a kill removes the rank's node, a new node joins.

Both find the node to kill by asking each live actor of the run which rank of which group size
it is now (actors keep their names through in-place resizes). The netcluster brings a node back
in the background (it returns while training goes on, as a replaced machine would); the local
cluster adds it at the step boundary (its ``add_node`` is not safe beside a run's shutdown).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading

SYSTEM_CONFIG = {  # a lost node is declared dead in ~1.5 s (Ray's default is ~30 s)
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def _who(trainer):
    """(node id, pid, rank, group size) of a rank; None for an actor that has not joined a group."""
    import ray

    if trainer is None:
        return None
    return ray.get_runtime_context().get_node_id(), os.getpid(), trainer.ctx.rank, trainer.ctx.world_size


def find_rank(run: str, rank: int, world: int):
    """``_who`` of the actor that is rank ``rank`` of a group of ``world`` ranks, or None."""
    import ray

    from cluster.group import NAMESPACE

    prefix = f"moetrain/{run}/"
    for name in [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)]:
        if not name.startswith(prefix):
            continue
        try:
            who = ray.get(ray.get_actor(name, namespace=NAMESPACE).run_fn.remote(_who), timeout=5)
        except Exception:  # starting, or lost
            continue
        if who is not None and who[2:] == (rank, world):
            return who
    return None


class _Background:
    def __init__(self):
        self._threads: list[threading.Thread] = []

    def bring_back(self) -> None:
        t = threading.Thread(target=self.add, daemon=True)
        t.start()
        self._threads.append(t)

    def settle(self) -> None:
        for t in self._threads:
            t.join()
        self._threads = []

    def add(self) -> None:
        raise NotImplementedError

    @staticmethod
    def wait_free(cpus: float = 4.0, wait_s: float = 60.0) -> None:
        """Until ``cpus`` CPUs are free (the last run's placement groups are removed
        asynchronously): every arm starts on its full size."""
        import time

        import ray

        deadline = time.monotonic() + wait_s
        while ray.available_resources().get("CPU", 0.0) < cpus and time.monotonic() < deadline:
            time.sleep(0.2)


class LocalNodes(_Background):
    """Two worker nodes of ``ray.cluster_utils.Cluster`` with room for 2 ranks each."""

    kind = "ray.cluster_utils.Cluster (one machine: 2 worker nodes x 2 CPUs, a head with none)"

    def __init__(self):
        import ray
        from ray.cluster_utils import Cluster

        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="rel-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = self.tmp
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG},
        )
        for _ in range(2):
            self.add()
        ray.init(address=self.cluster.address, namespace="moetrain", log_to_driver=False, configure_logging=False)

    def add(self) -> None:
        self.cluster.add_node(num_cpus=2, object_store_memory=120 * 2**20)
        self.cluster.wait_for_nodes()

    def kill_node_of(self, run: str, rank: int, world: int) -> bool:
        """Kill the node running rank ``rank`` while the group has ``world`` ranks (every process
        at once: the rank's first). False (nothing killed) while the group is smaller."""
        who = find_rank(run, rank, world)
        if who is None:
            return False
        node = next(n for n in self.cluster.worker_nodes if n.node_id == who[0])
        os.kill(who[1], signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)
        return True

    def reset(self) -> None:
        self.settle()
        for node in list(self.cluster.worker_nodes):
            try:
                self.cluster.remove_node(node)
            except Exception:
                pass
        for _ in range(2):
            self.add()
        self.wait_free()

    def bring_back(self) -> None:  # (Cluster.add_node from a thread raced the run's shutdown here)
        self.add()

    def close(self) -> None:
        import ray

        self.settle()
        ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


class NetNodes(_Background):
    """The netcluster ``cluster_id`` (built by the caller: 2 Ray nodes x 2 CPUs), from a driver
    running in the head's namespace; ``n1`` is killed and restarted."""

    kind = "netcluster (network namespaces: 2 Ray nodes x 2 CPUs, real addresses, unlimited links)"

    def __init__(self, cluster_id: str):
        import ray

        from scripts.tools import netcluster

        super().__init__()
        self.nc = netcluster.attach(cluster_id)
        self.victim = next(n for n in self.nc.info.ray_nodes() if n is not self.nc.info.head)
        self.killed = False
        ray.init(address=self.nc.info.ray_address, namespace="moetrain", log_to_driver=False, configure_logging=False)

    def add(self) -> None:
        self.nc.restart_node(self.victim.name)
        self.nc.wait_for_nodes(len(self.nc.info.ray_nodes()))
        self.killed = False

    def _alive(self) -> bool:
        import ray

        return any(n["Alive"] and n["NodeManagerAddress"] == self.victim.address for n in ray.nodes())

    def kill_node_of(self, run: str, rank: int, world: int) -> bool:
        """Kill ``n1`` (every process of its namespace) when it runs rank ``rank`` of a group of
        ``world`` ranks; False (nothing killed) otherwise."""
        import ray

        who = find_rank(run, rank, world)
        if who is None:
            return False
        address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == who[0])
        if address != self.victim.address:
            return False
        self.nc.kill_node(self.victim.name)
        self.killed = True
        return True

    def reset(self) -> None:
        self.settle()
        if self.killed or not self._alive():  # (a killed node may not be declared dead yet)
            self.add()
        self.wait_free()

    def close(self) -> None:
        import ray

        self.settle()
        ray.shutdown()
