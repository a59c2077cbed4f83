"""Checkpoint orchestration across the worker group: the driver's half.

Owns: when to checkpoint, the two-phase protocol, and which checkpoint to resume from. The rank's
half (what it saves, the fence, loading) is ``moetrain.train.checkpointer.RankCheckpointer``.
1. At a step boundary every rank starts copying what it owns to host memory and streaming it in
   a background thread (``RankCheckpointer.save``); the copy overlaps the next step's forward and
   backward, and a fence makes that step's ``optimizer.step()`` (and any expert migration) wait
   for it. The driver records the data cursor and the placement. Training continues at once.
2. A driver thread waits for every rank's upload (``MoERank.checkpoint_wait`` runs in a second
   actor thread, beside training), then commits: ``manifest.json`` written last, then ``latest``,
   then retention. A failed upload or commit marks the checkpoint failed, logs it, leaves
   ``latest`` alone, and training goes on; the next checkpoint is tried as usual.
Resume reads the manifest (:class:`ResumePoint`) and each rank loads only the objects it hosts.
"""

from __future__ import annotations

import logging
import threading
import uuid

import ray
from ray.exceptions import RayActorError

from cluster.group import WorkerGroupError
from moetrain.checkpoint import (
    CheckpointError,
    CheckpointRef,
    CorruptObjectError,
    Lease,
    commit,
    list_checkpoints,
    open_root,
    read_latest,
    read_manifest,
    resolve,
    verify,
)
from moetrain.checkpoint.layout import MANIFEST, latest_key, step_prefix
from moetrain.checkpoint.retention import plan_retention
from moetrain.config import RunConfig
from moetrain.train.checkpointer import ResumePoint

log = logging.getLogger("moetrain")


def due(cfg: RunConfig, step: int) -> bool:
    c = cfg.checkpoint
    return bool(c.uri) and c.every > 0 and step % c.every == 0 and step < cfg.train.steps


def check_store_writable(cfg: RunConfig) -> None:
    """Fail in seconds, before any actor starts, when the checkpoint store cannot be written:
    write and delete a small probe object under the run's prefix. Raises
    :class:`CheckpointError` (one line naming the store) — a user error, exit status 2."""
    if not cfg.checkpoint.uri:
        return
    key = f"{cfg.cluster.run_name}/.write-probe-{uuid.uuid4().hex[:12]}"
    try:
        store = open_root(cfg.checkpoint.uri, cfg.checkpoint, cfg.storage)
        store.write_bytes(key, b"moetrain write probe")
        store.delete(key)
    except CheckpointError as exc:
        raise type(exc)(f"checkpoint store {cfg.checkpoint.uri} is not writable: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint store {cfg.checkpoint.uri} is not writable: {exc}") from None


def acquire_lease(cfg: RunConfig) -> Lease | None:
    """Take this run's lease on its name in the checkpoint store (None without checkpoints).
    A live lease of another run raises :class:`~moetrain.checkpoint.LeaseHeldError` (one line,
    exit 2) before any actor starts. The caller releases it when the run ends, however it ends."""
    if not cfg.checkpoint.uri:
        return None
    store = open_root(cfg.checkpoint.uri, cfg.checkpoint, cfg.storage)
    return Lease(store, cfg.cluster.run_name, ttl_s=cfg.checkpoint.lease_ttl_s).acquire()


def remove_uncommitted(cfg: RunConfig) -> list[int]:
    """Delete this run's step folders that no manifest commits (partial uploads of a crashed or
    failed run keep a disk full otherwise). Call only while no checkpoint of the run is in
    flight: at start, and after a failure once the commit thread is done. Returns the steps."""
    if not cfg.checkpoint.uri:
        return []
    from moetrain.checkpoint import list_checkpoints
    from moetrain.checkpoint.layout import step_prefix

    store = open_root(cfg.checkpoint.uri, cfg.checkpoint, cfg.storage)
    steps = [i.step for i in list_checkpoints(store, cfg.cluster.run_name) if not i.committed]
    for step in steps:
        store.delete_prefix(step_prefix(cfg.cluster.run_name, step))
    if steps:
        log.info("removed uncommitted checkpoint folders of run %s: steps %s", cfg.cluster.run_name, steps)
    return steps


def lineage_of(store, run: str, step: int) -> str:
    """The run id recorded in a committed checkpoint's manifest ("" before run ids existed)."""
    return str(read_manifest(CheckpointRef(store, run, step)).meta.get("run_id", ""))


def retain_lineage(store, run: str, keep: int, run_id: str) -> list[int]:
    """Keep the newest ``keep`` committed checkpoints of lineage ``run_id`` (and ``latest``);
    delete its older ones and uncommitted leftovers older than the newest commit. Checkpoints of
    other lineages under the same run name are never touched. Returns the deleted steps."""
    infos = list_checkpoints(store, run)
    try:
        latest = read_latest(store, run)
    except CheckpointError:
        latest = None
    own = [i for i in infos if i.committed and lineage_of(store, run, i.step) == run_id]
    _, drop, _ = plan_retention(own, keep, latest)
    _, _, garbage = plan_retention(infos, None, latest)
    for step in drop:
        store.delete(f"{step_prefix(run, step)}/{MANIFEST}")  # uncommit first
        store.delete_prefix(step_prefix(run, step))
    for step in garbage:
        store.delete_prefix(step_prefix(run, step))
    return sorted(drop + garbage)


def check_fresh_run(cfg: RunConfig) -> None:
    """Never mix two lineages under one run name. A run that does not resume must find no
    committed checkpoint of its name; a resumed run none after the step it resumes from (they
    would collide with the steps it is about to write). Otherwise refuse in one line (exit 2),
    unless ``checkpoint.overwrite`` deletes them first."""
    c = cfg.checkpoint
    if not c.uri:
        return
    run = cfg.cluster.run_name
    after = ResumePoint.read(c, c.resume, run=run, store_cfg=cfg.storage).step if c.resume else -1
    store = open_root(c.uri, c, cfg.storage)
    clash = [i.step for i in list_checkpoints(store, run) if i.committed and i.step > after]
    if not clash:
        return
    if c.overwrite:
        store.delete(latest_key(run))  # it may name a deleted step; the next commit writes it again
        for step in clash:
            store.delete(f"{step_prefix(run, step)}/{MANIFEST}")
            store.delete_prefix(step_prefix(run, step))
        log.warning("checkpoint.overwrite: deleted committed checkpoints %s of run %s under %s", clash, run, c.uri)
        return
    shown = ", ".join(map(str, clash[-5:]))
    where = "" if after < 0 else f" after step {after}, the step this run resumes from"
    raise CheckpointError(
        f"{store.uri_of(run)} already holds committed checkpoints of run {run!r}{where} (steps ..{shown}): "
        f"resume with --resume latest, choose another cluster.run_name, or set checkpoint.overwrite=true to "
        f"delete them (`moetrain ckpt list {store.uri_of(run)}` shows them)"
    )


def check_resume(cfg: RunConfig) -> None:
    """Before any actor: the checkpoint ``checkpoint.resume`` names is committed and every object
    of it has its manifest's size and checksum (one read of the checkpoint on the driver). Else
    :class:`CheckpointError` (exit 2) naming the first problem and the newest older committed
    step that is intact, to resume from instead."""
    c = cfg.checkpoint
    if not c.resume:
        return
    ref = resolve(c.resume, c, run=cfg.cluster.run_name, store_cfg=cfg.storage)
    report = verify(ref, values=False)
    if report.ok:
        return
    more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    older = sorted(
        (i.step for i in list_checkpoints(ref.store, ref.run) if i.committed and i.step < ref.step), reverse=True
    )
    intact = next((s for s in older if verify(CheckpointRef(ref.store, ref.run, s), values=False).ok), None)
    if intact is None:
        hint = f"no older committed step of run {ref.run!r} is intact"
    else:
        uri = ref.store.uri_of(step_prefix(ref.run, intact))
        hint = f"the newest intact committed step is {uri}: resume from it with --resume {uri}"
    raise CorruptObjectError(f"cannot resume from {ref.uri}: {report.problems[0]}{more}; {hint}")


def resolve_resume(cfg: RunConfig) -> ResumePoint | None:
    """The checkpoint ``checkpoint.resume`` names (validated manifest), or None."""
    if not cfg.checkpoint.resume:
        return None
    point = ResumePoint.read(cfg.checkpoint, cfg.checkpoint.resume, run=cfg.cluster.run_name, store_cfg=cfg.storage)
    point.check_compatible(cfg)
    return point


def _gather(refs) -> list:
    """Every rank's upload result, in rank order; ranks that died while uploading raise one
    :class:`WorkerGroupError` (``lost``) naming them, after the others have answered."""
    results, lost = [], []
    for rank, ref in enumerate(refs):
        try:
            results.append(ray.get(ref))
        except RayActorError:
            lost.append(rank)
    if lost:
        raise WorkerGroupError(
            f"[Rank {', '.join(map(str, lost))}]: actor died (process killed or node lost) while uploading", lost, True
        )
    return results


class Coordinator:
    """Driver half of checkpointing: start on all ranks, commit in a background thread."""

    def __init__(self, cfg: RunConfig, telemetry=None, run_id: str = "", lease: Lease | None = None):
        self.cfg, self.telemetry = cfg, telemetry
        self.run_id = run_id  # recorded in every manifest; retention touches only this lineage
        self.lease = lease  # checked by every commit: a writer that lost its run name's lease commits nothing
        self._thread: threading.Thread | None = None
        self.committed: list[str] = []
        self.failed: list[tuple[int, str]] = []  # (step, first line of the error)
        self.consecutive_failures = 0  # failed checkpoints since the last committed one
        self._outcome: dict[int, str] = {}  # step -> "" (committed) or the error of its latest attempt
        self._lost: dict[int, WorkerGroupError] = {}  # step -> a rank died while it uploaded

    def start(self, group, step: int, placement) -> None:
        self.wait()  # at most one commit in flight
        started = group.call("checkpoint", step)  # list[SaveStarted], rank order
        meta = {
            "step": step,
            "run_id": self.run_id,
            "cursor": started[0].cursor,
            "placement": placement.to_json(),
            "config": self.cfg.to_dict(),
            "world_size": len(group.actors),
        }
        stall = max(s.stall_s for s in started)
        refs = [a.checkpoint_wait.remote() for a in group.actors]
        self._thread = threading.Thread(
            target=self._commit, args=(refs, step, meta, stall), name=f"ckpt-commit-{step}", daemon=True
        )
        self._thread.start()

    def _commit(self, refs, step: int, meta: dict, stall: float) -> None:
        self._lost.pop(step, None)
        try:
            results = _gather(refs)
            failed = [
                f"[Rank {i}]: {r if isinstance(r, str) else r.error}"
                for i, r in enumerate(results)
                if isinstance(r, str) or not r.ok
            ]
            if failed:
                raise CheckpointError("; ".join(failed))
            store = open_root(self.cfg.checkpoint.uri, self.cfg.checkpoint, self.cfg.storage)
            manifest = commit(store, self.cfg.cluster.run_name, step, results, meta, lease=self.lease)
            retain_lineage(store, self.cfg.cluster.run_name, self.cfg.checkpoint.keep, self.run_id)
            mb = manifest.total_bytes / 2**20
            secs = max(max(r.upload_s for r in results), 1e-9)
            uri = store.uri_of(f"{self.cfg.cluster.run_name}/step-{step}")
            self.committed.append(uri)
            self.consecutive_failures = 0
            self._outcome[step] = ""
            log.info("checkpoint step %d committed: %.1f MB, stall %.3f s, %s", step, mb, stall, uri)
            if self.telemetry:
                self.telemetry.checkpoint(step, mb / secs, stall)
        except Exception as exc:  # a failed checkpoint never stops training
            msg = str(exc).splitlines()[0][:300]
            self.failed.append((step, msg))
            self._outcome[step] = msg
            if isinstance(exc, WorkerGroupError):
                self._lost[step] = exc
            self.consecutive_failures += 1
            log.warning("checkpoint step %d FAILED (latest unchanged): %s", step, msg)
            if self.telemetry:
                self.telemetry.checkpoint_failed(step)

    def step_failed(self, step: int) -> str:
        """The error of the latest attempt at checkpoint ``step`` if it failed, else "" (a
        checkpoint retried after a restart and committed is not failed)."""
        return self._outcome.get(step, "")

    def lost_worker(self, step: int) -> WorkerGroupError | None:
        """The latest attempt at checkpoint ``step`` failed because a rank died while it uploaded
        (a lost node): the controller treats that as any lost worker (restart and retry)."""
        return self._lost.get(step)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def latest(self) -> ResumePoint | None:
        """The newest committed checkpoint of this run, or None."""
        if not self.cfg.checkpoint.uri:
            return None
        try:
            return ResumePoint.read(
                self.cfg.checkpoint, "latest", run=self.cfg.cluster.run_name, store_cfg=self.cfg.storage
            )
        except CheckpointError:
            return None
