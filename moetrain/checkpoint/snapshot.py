"""Host-memory snapshots of one rank's checkpoint objects.

Owns: ``snapshot(objects)``: detached, contiguous CPU copies of every tensor (numpy arrays
too) of ``{object name: state dict}``, so training may mutate its tensors while the copy is
uploaded. This copy is the only part of a checkpoint that has to happen at the step boundary.
CUDA tensors are copied into pinned host buffers (asynchronous DMA, one synchronisation per
snapshot); CPU tensors are plain copies.

Overlapped snapshots (CheckFreq-style, FAST'21): the copy may instead run on a background
thread during the next step's forward / backward, which only *read* weights and optimizer
state, provided it completes before anything writes them (the next ``optimizer.step()``; see
``AsyncCheckpointWriter.install_fence``). To never store a torn checkpoint, every tensor's
autograd version counter is recorded when the checkpoint is requested and checked after its
copy: an in-place change in between raises :class:`TornSnapshotError`. (Writes through
``.data`` bypass version counters; do not mix them with overlapped snapshots.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from moetrain.checkpoint.errors import CheckpointError, SerializationError, TornSnapshotError
from moetrain.checkpoint.layout import check_name


@dataclass(frozen=True)
class Snapshot:
    """Host-memory copy of one rank's objects, owned by the checkpoint (training may go on)."""

    objects: dict[str, Any]  # object name -> state dict (CPU tensors, contiguous)
    nbytes: int  # bytes of tensor / array data held
    seconds: float = 0.0  # time the copy took


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples, in traversal order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_tensors(v)


def state_nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in iter_tensors(value))


def tensor_versions(objects: Mapping[str, Any]) -> dict[int, int]:
    """{id(tensor): version counter} of every tensor: the state a checkpoint must capture."""
    return {id(t): t._version for state in objects.values() for t in iter_tensors(state)}


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``t``. A CUDA tensor goes into a pinned (page-locked) host buffer
    with an asynchronous copy (DMA, no staging through pageable memory): the caller
    synchronises once (:func:`snapshot` does) before reading it."""
    t = t.detach()
    if t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to("cpu", copy=True, memory_format=torch.contiguous_format)


def _copy(value: Any, where: str, counter: list[int], versions: dict[int, int] | None) -> Any:
    if isinstance(value, torch.Tensor):
        out = host_copy(value)
        if versions is not None and value._version != versions.get(id(value), value._version):
            raise TornSnapshotError(
                f"{where} was modified in place while its checkpoint copy was taken: call "
                "writer.fence() (e.g. writer.install_fence(optimizer)) before changing it"
            )
        counter[0] += out.numel() * out.element_size()
        return out
    if isinstance(value, np.ndarray):
        counter[0] += value.nbytes
        return np.array(value, copy=True, order="C")
    if isinstance(value, dict):
        return {k: _copy(v, f"{where}[{k!r}]", counter, versions) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v, f"{where}[{i}]", counter, versions) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_copy(v, f"{where}[{i}]", counter, versions) for i, v in enumerate(value))
    return value  # numbers, strings, bytes: immutable; anything else fails at serialisation


def snapshot(objects: Mapping[str, Any], *, versions: dict[int, int] | None = None) -> Snapshot:
    """Copy ``objects`` (name -> state dict of tensors and small values) to host memory.

    Call it at the step boundary (after ``optimizer.step()``). With ``versions`` (from
    :func:`tensor_versions` at request time) a tensor changed since then raises
    :class:`TornSnapshotError`. Object names are validated first."""
    start = time.perf_counter()
    for name in objects:
        check_name(name)
    counter = [0]
    copied = {}
    for name, state in objects.items():
        try:
            copied[name] = _copy(state, name, counter, versions)
        except CheckpointError:
            raise
        except Exception as exc:  # e.g. a meta tensor: there is nothing to copy
            raise SerializationError(f"snapshot of object {name!r} failed: {type(exc).__name__}: {exc}") from exc
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the pinned-buffer copies of CUDA tensors are complete
    return Snapshot(objects=copied, nbytes=counter[0], seconds=time.perf_counter() - start)
