"""The worker actor: one Ray actor per rank, hosting that rank's :class:`RankTrainer`.

Owns: the process-level life of a rank — its torch.distributed membership (rendezvous address
published by rank 0 through Ray, as Ray Train does; collectives bound to the network interface
that carries the rank's Ray node address, so no host-name lookup picks a loopback address),
thread settings (the rank's own CPU bundle), and thin remote methods that the worker group calls
on every rank in lockstep. All training logic lives in ``moetrain``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from moetrain.train.trainer import RankTrainer


def interface_for_ip(ip: str) -> str | None:
    """Name of the network interface that holds address ``ip`` (e.g. ``127.0.0.1`` -> ``lo``), or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == ip for a in addrs):
            return name
    return None


def bind_collectives(node_ip: str, gpu: bool, env=os.environ) -> str:
    """Point gloo (and NCCL on GPU) at the interface carrying ``node_ip`` unless the user set
    ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``; returns the interface gloo will use ("" = its
    own choice: the address is on no interface here)."""
    ifname = interface_for_ip(node_ip) or ""
    if ifname:
        env.setdefault("GLOO_SOCKET_IFNAME", ifname)
        if gpu:
            env.setdefault("NCCL_SOCKET_IFNAME", ifname)
    return env.get("GLOO_SOCKET_IFNAME", "")


def threads_for(cpus_per_worker: float, torch_threads: int = 0) -> int:
    """Threads of one rank: ``cluster.torch_threads`` if set, else its CPU bundle (at least 1)."""
    return torch_threads or max(1, int(cpus_per_worker))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class MoERank:
    """One rank of a moetrain run (wrapped with ``ray.remote`` by the worker group).

    The class name and :meth:`__repr__` are what the Ray dashboard's Actors tab shows (Class and
    Repr columns; ``repr_name`` in the state API). Ray takes the repr once, right after
    ``__init__``, so the worker group gives the actor what it knows then: the experts the rank will
    hold per layer (``held``) and the step it starts from (``start_step``); the dashboard shows
    ``MoERank(run=demo, rank 0 of 2, experts per layer 4,4, step 0, starting)``. Afterwards the
    repr follows the rank (step, what it is doing, experts after a migration) for logs, debuggers
    and ``run_fn`` callers; the run's live step and state are the ``moetrain_step`` and
    ``moetrain_state`` metrics."""

    trainer: RankTrainer | None
    _state = "created"  # created -> idle <-> training / evaluating / migrating / checkpointing -> shut down

    def __init__(self, cfg_dict: dict, rank: int, world_size: int, held: tuple[int, ...] = (), start_step: int = 0):
        from moetrain.config import from_dict

        self.cfg = from_dict(cfg_dict)
        self.rank, self.world_size = rank, world_size
        self._held, self._start_step = held, start_step
        if held:
            self._state = "starting"
        self.trainer = None
        self._snapshot: dict = {}  # objects kept by snapshot_prepare for snapshot_take
        self._store: Any = None  # the rendezvous store this actor hosts (rank 0 of a forming group)
        self._warm, self._warm_lock = False, threading.Lock()
        threads = threads_for(self.cfg.cluster.cpus_per_worker, self.cfg.cluster.torch_threads)
        import torch

        torch.set_num_threads(threads)

    def __repr__(self) -> str:
        """``MoERank(run=demo, rank 0 of 2, experts per layer 4,4, step 12, training)``; before
        :meth:`setup`, the experts and step the group announced at creation (if it did)."""
        who = f"run={self.cfg.cluster.run_name}, rank {self.rank} of {self.world_size}"
        t = self.trainer
        if t is not None:
            held: tuple[int, ...] = tuple(
                len(t.placement.local_experts(layer, self.rank)) for layer in range(t.placement.num_layers)
            )
            step = t.step
        elif self._held:
            held, step = self._held, self._start_step
        else:
            return f"MoERank({who}, {self._state})"
        return f"MoERank({who}, experts per layer {','.join(map(str, held))}, step {step}, {self._state})"

    @property
    def _trainer(self) -> RankTrainer:
        if self.trainer is None:
            raise RuntimeError(f"{self!r}: setup() has not run")
        return self.trainer

    def _doing(self, state: str, call):
        """``call(trainer)`` with ``state`` shown by :meth:`__repr__` while it runs."""
        trainer = self._trainer
        self._state = state
        try:
            return call(trainer)
        finally:
            self._state = "idle"

    def node_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def host_rendezvous(self, world_size: int) -> tuple[str, int]:
        """Rank 0 of a group about to form: open the rendezvous store now (on a port the system
        picks), so the ranks find it listening when they join (with ``tcp://`` init the ranks that
        come before the store back off: 0.3-0.6 s measured). Returns its address and port."""
        import datetime

        import torch.distributed as dist

        t = datetime.timedelta(seconds=self.cfg.cluster.collective_timeout_s)
        store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, wait_for_workers=False, timeout=t)
        self._store = store
        return ray.util.get_node_ip_address(), store.port

    def where(self) -> str:
        """The Ray node id this actor runs on (answered once ``__init__`` is done: a joiner is ready)."""
        return ray.get_runtime_context().get_node_id()

    def warm(self) -> str:
        """Before joining a group (a growth's actor, in the background): import the trainer, open
        the run's data (prepared and cached on this node) and take one fused AdamW step, so that
        joining at the step boundary costs only the rendezvous and the state. Returns the node id."""
        with self._warm_lock:  # (a second call waits for the first and returns)
            if not self._warm:
                self._warm_up()
                self._warm = True
        return self.where()

    def _warm_up(self) -> None:
        import torch

        from moetrain.data.training import open_training_data
        from moetrain.train import trainer  # noqa: F401  (the model, dispatch, optimizer modules)

        c = self.cfg
        open_training_data(c.data, c.train.global_batch_size, c.storage)
        p = torch.nn.Parameter(torch.zeros(4))  # the first (fused) AdamW imports torch._dynamo: ~1.2 s here
        p.grad = torch.zeros(4)
        torch.optim.AdamW([p], fused=True).step()

    def rejoin(self, rank: int, cfg_dict: dict, master_addr: str, master_port: int, placement, state, node_R) -> dict:
        """An in-place resize: leave the process group (a lost rank broke it, or the group grows),
        join a new one as ``rank`` of ``placement.num_ranks`` with the run's config for that size
        (``cfg_dict``) and rebuild the trainer from ``state`` (a
        step boundary's state in the object store, :class:`~cluster.elastic.MemoryState`). The
        process, its imports and warm caches stay, so no actor starts. A first thread still blocked
        in the old group's collective (a peer that hangs rather than dies) is left to its timeout:
        the new group's calls run on the other threads."""
        leave_process_group()
        old, self.trainer = self.trainer, None
        if old is not None:
            old.checkpointer.close()
        from moetrain.config import from_dict

        self.cfg, self.rank, self.world_size = from_dict(cfg_dict), rank, placement.num_ranks
        return self.setup(master_addr, master_port, placement, state, node_R)

    def setup(self, master_addr: str, master_port: int, placement, resume=None, node_R: tuple[int, ...] = ()) -> dict:
        """Join the process group, build data + model for ``placement`` (a
        :class:`~placement.placement.Placement`), and resume from ``resume`` (a
        :class:`~moetrain.train.checkpointer.ResumePoint`) if given. ``node_R``: the node of
        each rank (the worker group's layout)."""
        import torch

        from moetrain.parallel.context import init_distributed
        from moetrain.train.trainer import RankTrainer

        t0 = time.perf_counter()
        node_ip = ray.util.get_node_ip_address()
        ifname = bind_collectives(node_ip, self.cfg.cluster.use_gpu)
        backend = "nccl" if self.cfg.cluster.use_gpu else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        store, self._store = (self._store if self.rank == 0 else None), None  # (host_rendezvous's, on rank 0)
        ctx = init_distributed(
            backend=backend,
            master_addr=master_addr,
            master_port=master_port,
            rank=self.rank,
            world_size=self.world_size,
            timeout_s=self.cfg.cluster.collective_timeout_s,
            node_R=tuple(node_R),
            store=store,
        )
        self.trainer = RankTrainer(self.cfg, ctx=ctx, placement=placement, load_init_weights=resume is None)
        if resume is not None:
            if hasattr(resume, "resume_point"):  # an elastic resize: the state is in the object store
                resume = resume.resume_point()
            self.trainer.resume_from(resume)
        self._state = "idle"
        return {
            "rank": self.rank,
            "setup_s": time.perf_counter() - t0,
            "node_ip": node_ip,
            "node_id": ray.get_runtime_context().get_node_id(),
            "ifname": ifname,
            "threads": torch.get_num_threads(),
            **self.memory(),
        }

    # ---- lockstep calls (every rank at once) ----------------------------------------------
    def train_step(self):
        return self._doing("training", lambda t: t.train_step())

    def evaluate(self) -> dict:
        return self._doing("evaluating", lambda t: t.evaluate())

    def routing_stats(self):
        return self._trainer.routing_stats()

    def migrate(self, placement):
        """Move experts to ``placement`` (returns this rank's ``MigrationReport``)."""
        return self._doing("migrating", lambda t: t.migrate(placement))

    def checkpoint(self, step: int):
        """Start checkpoint ``step`` on this rank (returns a ``SaveStarted`` at once)."""
        return self._doing("checkpointing", lambda t: t.checkpointer.save(step))

    def snapshot_prepare(self, step: int, names: list[str] | None = None, with_dense: bool | None = None) -> dict:
        """Copy what a checkpoint of ``step`` would hold on this rank (a collective under ZeRO), or
        the objects ``names`` (any replica it holds; dense state if ``with_dense``: a recovery
        from memory after a loss), and keep them for :meth:`snapshot_take`: returns the object
        names, their bytes and the data cursor at that step boundary. Runs beside a step blocked
        in a collective with a lost rank (the actor's second thread): that step's update has not
        been applied, so the tensors are those of the step boundary."""
        t = self._trainer
        if step != t.step:
            raise ValueError(f"snapshot of step {step} asked for, but the rank is at step {t.step}")
        if t.fault_hook is not None:  # fault injection: a rank lost while the state is collected
            t.fault_hook("snapshot", t.step)
        objects = t.checkpointer.objects(with_dense=with_dense, replicas=names is not None)
        keep = sorted(n for n in objects if not n.startswith("rng/")) if names is None else names
        missing = [n for n in keep if n not in objects]
        if missing:
            raise KeyError(f"rank {self.rank} holds none of {missing[:5]}")
        self._snapshot = {name: _cpu_copy(objects[name]) for name in keep}
        nbytes = sum(v.numel() * v.element_size() for obj in self._snapshot.values() for v in _tensors(obj))
        return {"names": list(self._snapshot), "bytes": nbytes, "cursor": t.boundary_cursor()}

    def step_status(self) -> dict:
        """Where this rank's current step is (the actor's second thread answers while the first
        is blocked in a collective): ``{"step", "phase", "norm"}`` (see ``RankTrainer.step_status``)."""
        return self._trainer.step_status()

    def roll_forward(self, norm: float) -> int:
        """Finish the step in progress with the global gradient norm another rank saw (every
        gradient collective of the step completed everywhere); returns the step now reached."""
        self._trainer.roll_forward(norm)
        return self._trainer.step

    def snapshot_take(self):
        """The objects :meth:`snapshot_prepare` kept, one return value each (called with
        ``num_returns`` = their number, so each becomes its own object owned by the caller)."""
        objs, self._snapshot = list(self._snapshot.values()), {}
        return objs[0] if len(objs) == 1 else tuple(objs)

    def checkpoint_wait(self):
        """Runs in the actor's second thread, beside training: this rank's upload result."""
        return self._trainer.checkpointer.result()

    def export_tensors(self, kind: str = "param") -> dict:
        """Parameters or gradients keyed by name / logical expert (tests, debugging)."""
        return self._trainer.export_tensors(kind)

    def run_fn(self, fn, *args):
        """Run ``fn(trainer, *args)`` on this rank (benchmarks, experiments, debugging)."""
        return fn(self.trainer, *args)

    # ---- inspection --------------------------------------------------------------------------
    def memory(self) -> dict:
        import resource

        info = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        if self.trainer is not None:
            t = self.trainer
            info["expert_param_mb"] = sum(p.numel() * p.element_size() for _, p in t.model.expert_parameters()) / 2**20
            info["dense_param_mb"] = sum(p.numel() * p.element_size() for _, p in t.model.dense_parameters()) / 2**20
        return info

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.trainer is not None:
            self.trainer.checkpointer.close()
        self._state = "shut down"
        if dist.is_initialized():
            dist.destroy_process_group()


def leave_process_group() -> None:
    """Abort and destroy this process's default process group, if any. A collective blocked on a
    dead peer has failed by itself already (its sockets closed, measured: 0.02 s); on a hung peer
    gloo cannot be aborted, and the new group is built beside the blocked call."""
    import torch.distributed as dist

    from moetrain.train.zero import forget_process_groups

    forget_process_groups()
    if not dist.is_initialized():
        return
    try:
        dist.distributed_c10d._abort_process_group()  # NCCL: unblocks; gloo: drops the group
    except Exception:
        pass
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _cpu_copy(obj):
    """A detached CPU copy of the tensors in a checkpoint object (nested dicts)."""
    import torch

    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    return obj


def _tensors(obj):
    import torch

    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif torch.is_tensor(obj):
        yield obj
