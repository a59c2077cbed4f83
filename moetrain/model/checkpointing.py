"""Activation checkpointing (``train.activation_checkpointing: none | block | attention``).

Owns: which regions of the model are recomputed in backward instead of keeping their
activations, and the wrapper that does it (``torch.utils.checkpoint``, non-reentrant).

Design rule: **a checkpointed region never contains a collective.** An MoE layer's forward
runs all-to-alls (split sizes, payload, slot ids, the combine); recomputing them in backward
would issue extra collectives that the other ranks do not issue at that moment (a deadlock, or
rows exchanged with the wrong peer), and would recompute routing decisions from other ranks'
data. So the regions are cut *around* the dispatcher:

- ``attention``: per block, the attention sub-block ``attn(attn_norm(x))`` (QKV, rotary, SDPA
  and output projection; its input x is kept).
- ``block``: the attention sub-block as above, and
  - a dense block's FFN sub-block ``ffn(ffn_norm(h))``;
  - in an MoE block, each collective-free piece on its own: ``ffn_norm``, the router (fp32
    logits / softmax / top-k), the routed experts' SwiGLU internals (their input rows, the
    all-to-all output, are kept; the [N, F] gate / up / hidden are recomputed) and the shared
    experts. The dispatcher's dispatch and combine, and with them every all-to-all, are never
    inside a region: their inputs and outputs stay saved as without checkpointing.

Recompute order in backward is therefore free (any region may be recomputed at any time), the
results are those of ``none`` (same ops, same inputs; fp32 equivalence at 1e-5 in
tests/parallel/test_activation_checkpointing.py), and the number of collectives per step is the
same as without checkpointing (counted there too).

Modules are wrapped by replacing the instance's ``forward`` (parameter names and state dicts
stay unchanged, so checkpoints and exported tensors do not depend on this setting).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.config import ConfigError

MODES = ("none", "block", "attention")


def checkpointed(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, its activations recomputed in backward (plain call without grad)."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpoint_module(mod: nn.Module) -> None:
    """Make ``mod``'s forward a checkpointed region (idempotent). ``mod`` must not run a
    collective (see the module docstring)."""
    if getattr(mod, "_moetrain_checkpointed", False):
        return
    inner = mod.forward

    def forward(*args, **kwargs):
        return checkpointed(inner, *args, **kwargs)

    mod.forward = forward
    mod._moetrain_checkpointed = True  # type: ignore[assignment]  # a plain flag, not a parameter or buffer


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"train.activation_checkpointing ({mode!r}) must be one of {', '.join(MODES)}")
