"""Measuring what one micro-batch's forward keeps for backward (activation memory).

Owns: :func:`saved_activation_bytes` (bytes of the distinct tensor storages autograd saves
while a function runs, parameters excluded) and :func:`model_activation_bytes` (that, for one
forward of a model in a given precision and checkpointing mode). The memory planner and
``scripts/bench/bench_scale.py`` reuse them to calibrate and check activation estimates.

What is counted: every tensor packed by autograd's saved-tensor hooks, deduplicated by storage
(a view and its base count once), whole storage bytes. Under non-reentrant activation
checkpointing the region's internals are not packed (the checkpoint stores only its inputs),
which is exactly the memory it saves. Not counted: the forward's outputs that no backward
needs, transient peaks inside one op, and a recomputed region's internals during its backward
(at most one region at a time).
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch
from torch import nn


R = TypeVar("R")


def saved_activation_bytes(fn: Callable[[], R], params: Iterable[torch.Tensor] = ()) -> tuple[int, R]:
    """(bytes saved for backward while ``fn()`` runs, ``fn()``'s result). Storages of
    ``params`` are excluded; their bf16 casts count (they are held like activations)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def model_activation_bytes(model: nn.Module, tokens_BT: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> int:
    """Activation bytes one forward of ``model`` on ``tokens_BT`` keeps for backward, in the
    compute ``dtype`` (its checkpointing mode is whatever was applied to it). Runs a backward
    afterwards to release the graph (gradients are left in the parameters' ``.grad``)."""
    from moetrain.precision import autocast

    device = tokens_BT.device

    def forward():
        with autocast(dtype, device):
            return model(tokens_BT)

    nbytes, (logits, _) = saved_activation_bytes(forward, model.parameters())
    logits.float().mean().backward()
    return nbytes
