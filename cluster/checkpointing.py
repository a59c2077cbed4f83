"""Checkpoint orchestration across the worker group.

Owns: when to checkpoint, the two-phase protocol, and resume.
1. At a step boundary every rank starts copying what it owns to host memory and streaming it in
   a background thread (``Worker.checkpoint``); the copy overlaps the next step's forward and
   backward, and a fence makes that step's ``optimizer.step()`` (and any expert migration) wait
   for it. The driver records the data cursor and the placement. Training continues at once.
2. A driver thread waits for every rank's upload (``Worker.checkpoint_wait`` runs in a second
   actor thread, beside training), then commits: ``manifest.json`` written last, then ``latest``,
   then retention. A failed upload or commit marks the checkpoint failed, logs it, leaves
   ``latest`` alone, and training goes on; the next checkpoint is tried as usual.
Resume reads the manifest and each rank loads only the objects it hosts (``moetrain.train.state``).
"""

from __future__ import annotations

import logging
import threading
import time

import ray

from moetrain.checkpoint import (
    AsyncCheckpointWriter, CheckpointError, apply_retention, commit, load_objects, open_store, read_manifest,
    resolve,
)
from moetrain.config import RunConfig
from moetrain.train.state import load_rank_objects, rank_objects

log = logging.getLogger("moetrain")


def due(cfg: RunConfig, step: int) -> bool:
    c = cfg.checkpoint
    return bool(c.uri) and c.every > 0 and step % c.every == 0 and step < cfg.train.steps


# ---- worker side (called inside the rank's actor) ---------------------------------------------
def start_rank_checkpoint(worker, step: int) -> dict:
    """Snapshot this rank's objects and start streaming them. A store that cannot even be opened
    (unreachable, bad credentials) is reported, not raised: training goes on."""
    t0 = time.perf_counter()
    worker._ckpt_future = None
    worker._ckpt_error = ""
    try:
        if getattr(worker, "_ckpt_writer", None) is None:
            # Overlapped snapshot: save() returns at once and the host copy runs beside the next
            # step's forward/backward; the fence makes the next optimizer.step() wait for it.
            writer = AsyncCheckpointWriter.from_config(
                worker.cfg.checkpoint, worker.cfg.cluster.run_name, rank=worker.rank, on_error="mark",
                snapshot_mode="overlap")
            writer.install_fence(worker.trainer.optimizer)
            worker._ckpt_writer = writer
        worker._ckpt_future = worker._ckpt_writer.save(step, rank_objects(worker.trainer))
    except CheckpointError as exc:
        worker._ckpt_error = f"{type(exc).__name__}: {exc}"
    return {"stall_s": time.perf_counter() - t0, "error": worker._ckpt_error}


def wait_rank_checkpoint(worker):
    """This rank's SaveResult, or an error string when its checkpoint never started."""
    fut = getattr(worker, "_ckpt_future", None)
    return fut.result() if fut is not None else (getattr(worker, "_ckpt_error", "") or "no checkpoint started")


def load_into_trainer(trainer, cfg: RunConfig, resume: dict) -> None:
    ref = resolve(resume["uri"], cfg.checkpoint)
    manifest = read_manifest(ref)
    load_rank_objects(trainer, lambda names: load_objects(ref, names, manifest=manifest))
    trainer.cursor.load_state_dict(resume["cursor"])
    trainer.step = int(resume["step"])


# ---- driver side ----------------------------------------------------------------------------
def resume_info(cfg: RunConfig, uri_or_latest: str) -> dict:
    """What the group needs to resume from a committed checkpoint (validated manifest)."""
    ref = resolve(uri_or_latest, cfg.checkpoint, run=cfg.cluster.run_name)
    manifest = read_manifest(ref)
    meta = manifest.meta
    from placement.placement import Placement

    saved = Placement.from_json(meta["placement"])
    same = saved.num_ranks == cfg.cluster.num_workers
    return {"uri": ref.uri,
            "step": manifest.step, "cursor": meta["cursor"], "placement_json": meta["placement"],
            "same_shape": same, "saved_world_size": manifest.world_size}


def resolve_resume(cfg: RunConfig) -> dict | None:
    return resume_info(cfg, cfg.checkpoint.resume) if cfg.checkpoint.resume else None


class Coordinator:
    """Driver half of checkpointing: start on all ranks, commit in a background thread."""

    def __init__(self, cfg: RunConfig, telemetry=None):
        self.cfg, self.telemetry = cfg, telemetry
        self._thread: threading.Thread | None = None
        self.committed: list[str] = []
        self.failed: list[tuple[int, str]] = []

    def start(self, group, step: int, placement) -> None:
        self.wait()  # at most one commit in flight
        stalls = group.call("checkpoint", step)
        state = group.call_rank(0, "driver_state")
        meta = {"step": step, "cursor": state["cursor"], "placement": placement.to_json(),
                "config": self.cfg.to_dict(), "world_size": len(group.actors)}
        stall = max(s["stall_s"] for s in stalls)
        refs = [a.checkpoint_wait.remote() for a in group.actors]
        self._thread = threading.Thread(target=self._commit, args=(refs, step, meta, stall),
                                        name=f"ckpt-commit-{step}", daemon=True)
        self._thread.start()

    def _commit(self, refs, step: int, meta: dict, stall: float) -> None:
        try:
            results = ray.get(refs)
            failed = [f"[Rank {i}]: {r if isinstance(r, str) else r.error}" for i, r in enumerate(results)
                      if isinstance(r, str) or not r.ok]
            if failed:
                raise CheckpointError("; ".join(failed))
            store = open_store(self.cfg.checkpoint.uri, self.cfg.checkpoint)
            manifest = commit(store, self.cfg.cluster.run_name, step, results, meta)
            apply_retention(store, self.cfg.cluster.run_name, keep=self.cfg.checkpoint.keep)
            mb = manifest.total_bytes / 2**20
            secs = max(max(r.upload_s for r in results), 1e-9)
            uri = store.uri_of(f"{self.cfg.cluster.run_name}/step-{step}")
            self.committed.append(uri)
            log.info("checkpoint step %d committed: %.1f MB, stall %.3f s, %s", step, mb, stall, uri)
            if self.telemetry:
                self.telemetry.checkpoint(step, mb / secs, stall)
        except Exception as exc:  # a failed checkpoint never stops training
            msg = str(exc).splitlines()[0][:300]
            self.failed.append((step, msg))
            log.warning("checkpoint step %d FAILED (latest unchanged, training continues): %s", step, msg)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def latest(self) -> dict | None:
        """The newest committed checkpoint of this run, or None."""
        if not self.cfg.checkpoint.uri:
            return None
        try:
            return resume_info(self.cfg, "latest")
        except CheckpointError:
            return None


def ckpt_command(action: str, uri: str, s3_endpoint: str = "", gcs_endpoint: str = "") -> int:
    from moetrain.checkpoint import cli
    from moetrain.config import CheckpointConfig

    cfg = CheckpointConfig(uri=uri, s3_endpoint=s3_endpoint, gcs_endpoint=gcs_endpoint)
    if action == "list":
        _, table = cli.ckpt_list(uri, cfg)
        print(table)
        return 0
    if action == "verify":
        report, table = cli.ckpt_verify(uri, cfg)
        print(table)
        return 0 if report.ok else 1
    _, text = cli.ckpt_inspect(uri, cfg)
    print(text)
    return 0
