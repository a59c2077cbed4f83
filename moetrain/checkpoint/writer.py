"""One rank's checkpoint writer: snapshot at the step boundary, stream in the background.

Owns: ``snapshot(objects)`` (detached, contiguous CPU copies of every tensor, taken in the
training thread; the only part of a checkpoint that stalls training) and
``AsyncCheckpointWriter``, which streams a snapshot's objects to
``<root>/<run>/step-<N>/<name>`` on a background thread while training continues, and hands
back per-object ``{name, size, sha256}`` entries for the driver's :func:`manifest.commit`.

Rules:
- at most one checkpoint in flight per writer: ``save()`` first waits for the previous one;
- objects of one checkpoint upload concurrently (``max_concurrency``, for many small expert
  objects) and each object's tensors are released as soon as it is stored;
- ``async_upload=False`` writes in the calling thread without a snapshot copy;
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

import numpy as np
import torch

from moetrain.checkpoint.errors import CheckpointError, SerializationError
from moetrain.checkpoint.format import write_state
from moetrain.checkpoint.layout import ObjectEntry, check_name, check_run, check_step, step_prefix
from moetrain.checkpoint.storage import Store, open_store
from moetrain.config import CheckpointConfig

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "mark")


# --------------------------------------------------------------------------------------------
# Snapshot
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Host-memory copy of one rank's objects, owned by the checkpoint (training may go on)."""

    objects: dict[str, Any]  # object name -> state dict (CPU tensors, contiguous)
    nbytes: int  # bytes of tensor / array data held
    seconds: float = 0.0  # time the copy took


def _copy(value: Any, counter: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        out = value.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        counter[0] += out.numel() * out.element_size()
        return out
    if isinstance(value, np.ndarray):
        counter[0] += value.nbytes
        return np.array(value, copy=True, order="C")
    if isinstance(value, dict):
        return {k: _copy(v, counter) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v, counter) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v, counter) for v in value)
    return value  # numbers, strings, bytes: immutable; anything else fails at serialisation


def snapshot(objects: Mapping[str, Any]) -> Snapshot:
    """Copy ``objects`` (name -> state dict of tensors and small values) to host memory.

    Call it at the step boundary (after ``optimizer.step()``); training may then mutate its
    tensors. Object names are validated here, in the caller's thread."""
    start = time.perf_counter()
    for name in objects:
        check_name(name)
    counter = [0]
    copied = {}
    for name, state in objects.items():
        try:
            copied[name] = _copy(state, counter)
        except Exception as exc:  # e.g. a meta tensor: there is nothing to copy
            raise SerializationError(f"snapshot of object {name!r} failed: {type(exc).__name__}: {exc}") from exc
    if any(t.is_cuda for t in _tensors(objects)):
        torch.cuda.synchronize()
    return Snapshot(objects=copied, nbytes=counter[0], seconds=time.perf_counter() - start)


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _state_nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


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
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, name: str) -> Any:
        with self.lock:
            return self.objects.pop(name)


class AsyncCheckpointWriter:
    """Streams one rank's checkpoint objects to ``<store>/<run>/step-<N>/`` (see module doc)."""

    def __init__(self, store: Store, run: str, *, rank: int = 0, async_upload: bool = True,
                 on_error: str = "raise", max_concurrency: int = 4) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error ({on_error!r}) must be one of {ON_ERROR}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency ({max_concurrency}) must be >= 1")
        self.store, self.run, self.rank = store, check_run(run), rank
        self.async_upload, self.on_error = async_upload, on_error
        self._jobs = cf.ThreadPoolExecutor(1, thread_name_prefix=f"ckpt-r{rank}")
        self._uploads = cf.ThreadPoolExecutor(max_concurrency, thread_name_prefix=f"ckpt-r{rank}-obj")
        self._pending: CheckpointFuture | None = None

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, run: str, *, rank: int = 0,
                    on_error: str = "raise", **kwargs: Any) -> "AsyncCheckpointWriter":
        return cls(open_store(cfg.uri, cfg), run, rank=rank, async_upload=cfg.async_upload,
                   on_error=on_error, **kwargs)

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
        """Start checkpoint ``step`` of this rank; returns once the snapshot is taken.

        Waits for the previous checkpoint first (at most one in flight). ``objects`` may be a
        ready :class:`Snapshot` (used as is: the caller must not mutate it)."""
        check_step(step)
        self.wait()
        if isinstance(objects, Snapshot):
            job = _Job(step, dict(objects.objects), objects.nbytes, objects.seconds)
        elif self.async_upload:
            snap = snapshot(objects)
            job = _Job(step, dict(snap.objects), snap.nbytes, snap.seconds)
        else:  # synchronous: nothing runs while we write, no copy needed
            job = _Job(step, {check_name(n): s for n, s in objects.items()})
        if not self.async_upload:
            fut = CheckpointFuture(_completed(self._run_job(job)), self.on_error)
            fut.result()  # "raise" mode raises here, in the caller
            return fut
        self._pending = CheckpointFuture(self._jobs.submit(self._run_job, job), self.on_error)
        return self._pending

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
    def _write_one(self, job: _Job, name: str) -> ObjectEntry:
        state = job.take(name)
        key = f"{step_prefix(self.run, job.step)}/{name}"
        where = self.store.uri_of(key)
        try:
            res = self.store.write_atomic(key, lambda sink: write_state(sink, state, where))
        except CheckpointError:
            raise
        except Exception as exc:
            raise SerializationError(f"serialising {where} failed: {type(exc).__name__}: {exc}") from exc
        return ObjectEntry(name=name, size=res.size, sha256=res.sha256)

    def _run_job(self, job: _Job) -> tuple[SaveResult, CheckpointError | None]:
        start = time.perf_counter()
        names = sorted(job.objects, key=lambda n: -_state_nbytes(job.objects[n]))
        futures = {self._uploads.submit(self._write_one, job, n): n for n in names}
        cf.wait(futures)
        entries, failures = [], []
        for fut, name in futures.items():
            exc = fut.exception()
            if exc is None:
                entries.append(fut.result())
            else:
                failures.append((name, exc))
        base = dict(step=job.step, rank=self.rank, snapshot_bytes=job.snapshot_bytes,
                    snapshot_s=job.snapshot_s, upload_s=time.perf_counter() - start)
        if not failures:
            entries.sort(key=lambda e: e.name)
            return SaveResult(entries=tuple(entries), bytes_written=sum(e.size for e in entries),
                              **base), None
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
