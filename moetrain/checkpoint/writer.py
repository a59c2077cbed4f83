"""One rank's checkpoint writer: snapshot at the step boundary, stream in the background.

Owns: ``AsyncCheckpointWriter``, which streams a snapshot (see ``snapshot.py``) of a rank's
objects to ``<root>/<run>/step-<N>/<name>`` on a background thread while training continues,
and hands back per-object ``{name, size, checksum}`` entries for the driver's ``commit``
(the algorithm is the store's, ``checkpoint.checksum``: crc32c by default, or sha256).

Rules:
- at most one checkpoint in flight per writer: ``save()`` first waits for the previous one;
- ``snapshot_mode="sync"`` (default): ``save()`` copies the tensors before returning (the only
  stall); ``"overlap"``: the copy runs on the writer thread during the next forward/backward
  and :meth:`~AsyncCheckpointWriter.fence` (installed as an optimizer step pre-hook) holds the
  next ``optimizer.step()`` until it is done; a tensor changed too early fails the checkpoint
  (``TornSnapshotError``) instead of storing a torn one;
- objects of one checkpoint upload concurrently (``max_concurrency``, for many small expert
  objects) and each object's tensors are released as soon as it is stored;
- ``async_upload=False`` writes in the calling thread without a snapshot copy;
- a step that is already committed is never overwritten (the checkpoint fails instead);
- objects are streamed straight to their final keys (``direct_writes=True``, default: no
  temporary key + ``move``, i.e. no S3 server-side copy): the driver's ``manifest.json``, written
  atomically after every rank reported ``{size, checksum}``, is the commit, readers check it,
  and a partial object a failure may leave is never referenced (see ``storage``'s module doc,
  "Why direct writes are safe"); ``direct_writes=False`` restores temporary key + ``move``;
- ``on_error="raise"``: a failure raises :class:`CheckpointError` from ``wait()`` / the future /
  the next ``save()``; ``on_error="mark"``: nothing raises, the :class:`SaveResult` carries
  ``ok=False`` and the error text ("checkpoint failed" is logged), and training goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from moetrain.checkpoint.errors import CheckpointError, SerializationError
from moetrain.checkpoint.format import write_state
from moetrain.checkpoint.layout import (
    MANIFEST,
    ObjectEntry,
    check_name,
    check_run,
    check_step,
    step_prefix,
)
from moetrain.checkpoint.snapshot import Snapshot, snapshot, state_nbytes, tensor_versions
from moetrain.checkpoint.root import open_root
from moetrain.config import CheckpointConfig, StoreConfig
from moetrain.storage.store import Store

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "mark")
SNAPSHOT_MODES = ("sync", "overlap")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveResult:
    """What one rank stored for one checkpoint (plain data: picklable, Ray-friendly)."""

    step: int
    rank: int
    entries: tuple[ObjectEntry, ...] = ()
    error: str = ""  # "" when ok; else the failure, naming the object(s) and URI
    error_type: str = ""  # class name of the CheckpointError
    bytes_written: int = 0
    snapshot_bytes: int = 0
    snapshot_s: float = 0.0
    upload_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.upload_s if self.upload_s > 0 else 0.0


class CheckpointFuture:
    """Handle of one in-flight checkpoint of one rank."""

    def __init__(self, future: cf.Future, on_error: str) -> None:
        self._future = future
        self._on_error = on_error
        self.retrieved = False  # result() was called: a failure has been seen by the caller

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        """The :class:`SaveResult`; with ``on_error="raise"`` a failure raises instead."""
        result, exc = self._future.result(timeout)
        self.retrieved = True
        if exc is not None and self._on_error == "raise":
            raise exc
        return result

    def _result_quietly(self, timeout: float | None = None) -> SaveResult:
        return self._future.result(timeout)[0]


def _completed(value: tuple[SaveResult, CheckpointError | None]) -> cf.Future:
    fut: cf.Future = cf.Future()
    fut.set_result(value)
    return fut


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    step: int
    objects: dict[str, Any]  # popped as they are written, so memory is released early
    snapshot_bytes: int = 0
    snapshot_s: float = 0.0
    source: Mapping[str, Any] | None = None  # overlap mode: live tensors still to be copied
    versions: dict[int, int] | None = None  # their version counters at request time
    copied: threading.Event = field(default_factory=threading.Event)  # the fence
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, name: str) -> Any:
        with self.lock:
            return self.objects.pop(name)


class AsyncCheckpointWriter:
    """Streams one rank's checkpoint objects to ``<store>/<run>/step-<N>/`` (see module doc)."""

    def __init__(
        self,
        store: Store,
        run: str,
        *,
        rank: int = 0,
        async_upload: bool = True,
        on_error: str = "raise",
        max_concurrency: int = 4,
        snapshot_mode: str = "sync",
        direct_writes: bool = True,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error ({on_error!r}) must be one of {ON_ERROR}")
        if snapshot_mode not in SNAPSHOT_MODES:
            raise ValueError(f"snapshot_mode ({snapshot_mode!r}) must be one of {SNAPSHOT_MODES}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency ({max_concurrency}) must be >= 1")
        self.store, self.run, self.rank = store, check_run(run), rank
        self.async_upload, self.on_error, self.snapshot_mode = async_upload, on_error, snapshot_mode
        self.direct_writes = direct_writes
        self._jobs = cf.ThreadPoolExecutor(1, thread_name_prefix=f"ckpt-r{rank}")
        self._uploads = cf.ThreadPoolExecutor(max_concurrency, thread_name_prefix=f"ckpt-r{rank}-obj")
        self._pending: CheckpointFuture | None = None
        self._job: _Job | None = None
        self.fence_wait_s = 0.0  # total time fence() held training (overlap mode's stall)

    @classmethod
    def from_config(
        cls,
        cfg: CheckpointConfig,
        run: str,
        *,
        rank: int = 0,
        on_error: str = "raise",
        store_cfg: StoreConfig | None = None,
        **kwargs: Any,
    ) -> "AsyncCheckpointWriter":
        return cls(
            open_root(cfg.uri, cfg, store_cfg),
            run,
            rank=rank,
            async_upload=cfg.async_upload,
            on_error=on_error,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"AsyncCheckpointWriter({self.store.uri!r}, run={self.run!r}, rank={self.rank})"

    def __enter__(self) -> "AsyncCheckpointWriter":
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        try:
            self.close()
        except CheckpointError as err:
            if exc_type is None:
                raise
            log.warning("checkpoint writer closed while handling %s: %s", exc_type.__name__, err)

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def save(self, step: int, objects: Mapping[str, Any] | Snapshot) -> CheckpointFuture:
        """Start checkpoint ``step`` of this rank.

        Returns once the snapshot is taken (``snapshot_mode="sync"``), at once (``"overlap"``:
        call :meth:`fence` before mutating any tensor of ``objects``), or once everything is
        stored (``async_upload=False``). Waits for the previous checkpoint first (at most one
        in flight). ``objects`` may be a ready :class:`Snapshot` (the caller must not mutate it)."""
        check_step(step)
        self.wait()
        job = self._make_job(step, objects)
        if not self.async_upload:
            fut = CheckpointFuture(_completed(self._run_job(job)), self.on_error)
            fut.result()  # "raise" mode raises here, in the caller
            return fut
        self._job = job
        self._pending = CheckpointFuture(self._jobs.submit(self._run_job, job), self.on_error)
        return self._pending

    def _make_job(self, step: int, objects: Mapping[str, Any] | Snapshot) -> _Job:
        if isinstance(objects, Snapshot):
            job = _Job(step, dict(objects.objects), objects.nbytes, objects.seconds)
        elif not self.async_upload:  # nothing runs while we write: no copy needed
            job = _Job(step, {check_name(n): s for n, s in objects.items()})
        elif self.snapshot_mode == "overlap":
            for name in objects:
                check_name(name)
            return _Job(step, {}, source=dict(objects), versions=tensor_versions(objects))
        else:
            snap = snapshot(objects)
            job = _Job(step, dict(snap.objects), snap.nbytes, snap.seconds)
        job.copied.set()
        return job

    def fence(self, timeout: float | None = None) -> float:
        """Block until the in-flight checkpoint no longer reads training's tensors (its
        overlapped snapshot is copied); returns the seconds waited. A no-op in sync mode."""
        job = self._job
        if job is None or job.copied.is_set():
            return 0.0
        start = time.perf_counter()
        done = job.copied.wait(timeout)
        waited = time.perf_counter() - start
        self.fence_wait_s += waited
        if not done:
            raise CheckpointError(
                f"checkpoint step {job.step} rank {self.rank}: snapshot copy not done after {timeout}s"
            )
        return waited

    def install_fence(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`fence` before every ``optimizer.step()``; returns the hook handle.

        Install it before any other step pre-hook that changes saved tensors."""

        def hook(*_: Any) -> None:  # a step pre-hook must return None
            self.fence()

        return optimizer.register_step_pre_hook(hook)

    def wait(self, timeout: float | None = None) -> SaveResult | None:
        """Block until the in-flight checkpoint (if any) is stored; its result, or None.

        With ``on_error="raise"`` a failure raises here, unless the caller already got it from
        the future's ``result()``."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending._result_quietly(timeout) if pending.retrieved else pending.result(timeout)

    def close(self) -> None:
        """Wait for the in-flight checkpoint, then stop the threads."""
        try:
            self.wait()
        finally:
            self._jobs.shutdown(wait=True)
            self._uploads.shutdown(wait=True)

    # ---- background side -------------------------------------------------------------
    def _copy_source(self, job: _Job) -> None:
        """Overlap mode: take the snapshot on this thread, then release the fence."""
        try:
            assert job.source is not None  # overlap mode always has a source
            snap = snapshot(job.source, versions=job.versions)
            job.objects, job.snapshot_bytes, job.snapshot_s = dict(snap.objects), snap.nbytes, snap.seconds
        finally:
            job.source = job.versions = None
            job.copied.set()

    def _refuse_committed(self, step: int) -> None:
        """Never overwrite the objects of a committed checkpoint (its manifest would lie)."""
        manifest = f"{step_prefix(self.run, step)}/{MANIFEST}"
        if self.store.exists(manifest):
            raise CheckpointError(
                f"{self.store.uri_of(step_prefix(self.run, step))} is already committed: delete it "
                "(e.g. retention.apply_retention / `moetrain ckpt clean`) or save another step"
            )

    def _write_one(self, job: _Job, name: str) -> ObjectEntry:
        state = job.take(name)
        key = f"{step_prefix(self.run, job.step)}/{name}"
        where = self.store.uri_of(key)
        try:
            write = self.store.write_direct if self.direct_writes else self.store.write_atomic
            res = write(key, lambda sink: write_state(sink, state, where))
        except CheckpointError:
            raise
        except Exception as exc:
            raise SerializationError(f"serialising {where} failed: {type(exc).__name__}: {exc}") from exc
        return ObjectEntry(name=name, size=res.size, checksum=res.checksum, digest=res.digest)

    def _run_job(self, job: _Job) -> tuple[SaveResult, CheckpointError | None]:
        failures: list[tuple[str, BaseException]] = []
        entries: list[ObjectEntry] = []
        try:
            if job.source is not None:
                self._copy_source(job)
            self._refuse_committed(job.step)
        except CheckpointError as exc:
            failures.append(("(before upload)", exc))
        start = time.perf_counter()
        if not failures:
            names = sorted(job.objects, key=lambda n: -state_nbytes(job.objects[n]))
            futures = {self._uploads.submit(self._write_one, job, n): n for n in names}
            cf.wait(futures)
            for fut, name in futures.items():
                error = fut.exception()
                if error is None:
                    entries.append(fut.result())
                else:
                    failures.append((name, error))
        base: dict[str, Any] = dict(
            step=job.step,
            rank=self.rank,
            snapshot_bytes=job.snapshot_bytes,
            snapshot_s=job.snapshot_s,
            upload_s=time.perf_counter() - start,
        )
        if not failures:
            entries.sort(key=lambda e: e.name)
            return SaveResult(entries=tuple(entries), bytes_written=sum(e.size for e in entries), **base), None
        err = _grouped_error(job.step, self.rank, failures)
        log.warning("checkpoint failed: %s", err)
        return SaveResult(error=str(err), error_type=type(err).__name__, **base), err


def _grouped_error(step: int, rank: int, failures: list[tuple[str, BaseException]]) -> CheckpointError:
    """One error for all failed objects of a checkpoint, typed after the first failure."""
    first = failures[0][1]
    detail = "; ".join(f"{name}: {exc}" for name, exc in failures)
    text = f"checkpoint step {step} rank {rank}: {len(failures)} object(s) failed: {detail}"
    cls = type(first) if isinstance(first, CheckpointError) else CheckpointError
    try:
        err = cls(text)
    except TypeError:  # a subclass with a different constructor
        err = CheckpointError(text)
    err.__cause__ = first
    return err
