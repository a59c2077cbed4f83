"""Memory-planner validation: predicted (``moetrain.plan``) vs measured peak memory per rank.

Each configuration trains ``STEPS`` optimizer steps on spawned gloo ranks (the real
``RankTrainer``: model, all-to-all dispatch, gradient sync, AdamW); a rank's measured figure is its
peak resident set above its resident set once imports, data (opened and first read) and torch's
lazily imported optimizer machinery are loaded (``procs``), i.e. the planner's ``model_bytes`` (everything but the runtime
baseline). The most loaded rank counts.

Two allocator settings: ``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor over 64 KiB gets its own
mapping and is returned on free, so the resident set follows the bytes the step holds: what the
planner models, and what ``planner_max_rel_error`` scores) and glibc's defaults (a dynamic mmap
threshold up to 32 MiB: freed activations stay in the heap, so the resident set peaks higher;
reported next to it).
"""

from __future__ import annotations

import dataclasses
import gc
import os
from contextlib import contextmanager

from .procs import peak_rss, reset_peak_rss, run_ranks

STEPS = 2  # AdamW allocates its moments in step 1; step 2 runs forward / backward with them live
BASE_CONFIG = "olmoe-1b-7b-mini"
# (label, --set overrides): precision x ZeRO x checkpointing x actors x micro-batch.
CASES = (
    ("fp32 z0 none R1 mb8", ["cluster.num_workers=1", "train.global_batch_size=8"]),
    ("fp32 z0 none R2 mb8", ["cluster.num_workers=2", "train.global_batch_size=16"]),
    ("fp32 z0 none R4 mb8", ["cluster.num_workers=4", "train.global_batch_size=32"]),
    ("fp32 z0 none R2 mb16", ["cluster.num_workers=2", "train.global_batch_size=32"]),
    ("fp32 z0 none R2 mb4 accum2", ["cluster.num_workers=2", "train.global_batch_size=16", "train.grad_accum_steps=2"]),
    ("fp32 z0 none R4 mb16", ["cluster.num_workers=4", "train.global_batch_size=64"]),
    ("bf16 z0 none R2 mb8", ["cluster.num_workers=2", "train.global_batch_size=16", "train.precision=bf16"]),
    ("fp32 z1 none R4 mb8", ["cluster.num_workers=4", "train.global_batch_size=32", "train.zero_stage=1"]),
    ("fp32 z2 none R4 mb8", ["cluster.num_workers=4", "train.global_batch_size=32", "train.zero_stage=2"]),
    ("fp32 z0 block R2 mb16", ["cluster.num_workers=2", "train.global_batch_size=32", "train.activation_checkpointing=block"]),
    ("bf16 z1 block R4 mb8", ["cluster.num_workers=4", "train.global_batch_size=32", "train.precision=bf16",
                              "train.zero_stage=1", "train.activation_checkpointing=block"]),
)
# Shared by every case: a model big enough that its state dwarfs allocator noise, small enough for
# 4 ranks on a 2-core, 24 GB machine.
COMMON = ["model.dim=384", "model.n_layers=4", "model.n_heads=6", "model.moe.num_experts=16",
          "model.moe.top_k=4", "model.moe.expert_ffn_dim=384", "data.seq_len=128", "train.steps=2",
          "train.eval_every=0"]


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    label: str
    predicted_bytes: int
    measured_bytes: int  # MALLOC_MMAP_THRESHOLD_=65536
    measured_default_bytes: int | None = None  # glibc's default allocator settings

    @property
    def default_rel_error(self) -> float | None:
        if self.measured_default_bytes is None:
            return None
        return abs(self.predicted_bytes - self.measured_default_bytes) / self.measured_default_bytes

    @property
    def rel_error(self) -> float:
        return abs(self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def _rank_peak(ctx, cfg_dict: dict, steps: int) -> int:
    from moetrain.config import from_dict
    from moetrain.data.training import open_training_data
    from moetrain.train.trainer import RankTrainer

    import torch

    cfg = from_dict(cfg_dict)
    data = open_training_data(cfg.data, cfg.train.global_batch_size)
    data.next_micro_batches(1, ctx.world_size, ctx.rank)  # the reader's first use: part of the runtime term
    warm = torch.nn.Parameter(torch.zeros(4))  # the first AdamW step imports ~70 MB of modules
    warm.grad = torch.ones(4)
    torch.optim.AdamW([warm], foreach=False).step()
    gc.collect()
    base = reset_peak_rss()
    trainer = RankTrainer(cfg, ctx=ctx, dataset=data)
    for _ in range(steps):
        trainer.train_step()
    return peak_rss() - base


MMAP_THRESHOLD = "65536"


@contextmanager
def _env(key: str, value: str | None):
    """Set (or, with None, unset) an environment variable for the processes spawned inside."""
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def validate_planner(cases=None, *, steps: int = STEPS, common=COMMON, base: str = BASE_CONFIG,
                     glibc_default: bool = True) -> list[MemoryRow]:
    """Predicted vs measured peak bytes per rank for each case (the most loaded rank counts), with
    a fixed 64 KiB mmap threshold and, if ``glibc_default``, with glibc's defaults too."""
    from moetrain.config import load_config
    from moetrain.data.training import open_training_data
    from moetrain.plan import plan_memory

    rows = []
    for label, sets in (CASES if cases is None else cases):
        cfg = load_config(base, list(common) + list(sets))
        vocab = open_training_data(cfg.data, cfg.train.global_batch_size).vocab_size  # the trained tokenizer's size (built once, cached)
        cfg = load_config(base, list(common) + list(sets) + [f"model.vocab_size={vocab}"])
        predicted = plan_memory(cfg, suggest=False).model_bytes
        with _env("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD):
            measured = max(run_ranks(_rank_peak, cfg.cluster.num_workers, cfg.to_dict(), steps))
        default = None
        if glibc_default:
            with _env("MALLOC_MMAP_THRESHOLD_", None):
                default = max(run_ranks(_rank_peak, cfg.cluster.num_workers, cfg.to_dict(), steps))
        rows.append(MemoryRow(label, predicted, measured, default))
    return rows
