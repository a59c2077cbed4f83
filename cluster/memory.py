"""Memory available to a run's ranks, and the planner's verdict before any actor starts.

Owns: where the per-rank memory figure comes from — ``--memory-gb``, the connected Ray cluster's
``memory`` resource, or this machine's memory — and refusing a run that ``moetrain.plan`` says
cannot fit (one line: the shortfall and the first suggestion; the CLI exits 2). GPU runs: Ray has
no GPU-memory resource, so their memory is known only from ``--memory-gb`` (``moetrain plan``).
"""

from __future__ import annotations

import dataclasses

from moetrain.config import ConfigError, RunConfig
from moetrain.plan import GIB, MemoryPlan, local_memory_bytes, plan_memory, refusal


def ray_memory_per_rank(cfg: RunConfig) -> tuple[int | None, str]:
    """(bytes per rank, source) from the connected Ray cluster: the alive nodes' ``memory`` and
    ``object_store_memory`` resources summed (together: the memory each node had available when it
    started; the object store is reserved lazily), over ``cluster.num_workers`` actors; (None, why)
    when unknown."""
    import ray

    if cfg.cluster.use_gpu:
        return None, "GPU memory is not a Ray resource: pass --memory-gb to `moetrain plan`"
    total = sum(
        n.get("Resources", {}).get(key, 0.0)
        for n in ray.nodes()
        if n.get("Alive")
        for key in ("memory", "object_store_memory")
    )
    if total <= 0:
        return None, "the Ray cluster reports no memory resource"
    n = cfg.cluster.num_workers
    return int(total / n), f"Ray nodes' memory {total / GIB:.1f} GiB / {n} actor(s)"


def local_memory_per_rank(cfg: RunConfig) -> tuple[int | None, str]:
    """(bytes per rank, source) from this machine's memory, for an embedded local Ray."""
    if cfg.cluster.use_gpu:
        return None, "GPU memory unknown: pass --memory-gb"
    total, n = local_memory_bytes(), cfg.cluster.num_workers
    return total // n, f"this machine's {total / GIB:.1f} GiB / {n} actor(s)"


def with_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """``cfg`` with model.vocab_size taken from the tokenizer when it is 0."""
    if cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))


def check_fits(cfg: RunConfig) -> MemoryPlan:
    """Plan ``cfg`` against the connected Ray cluster's memory; raise :class:`ConfigError` with
    the planner's one-line refusal when it cannot fit. Returns the plan (for the run summary)."""
    available, source = ray_memory_per_rank(cfg)
    plan = plan_memory(cfg, available_bytes=available, source=source)
    if plan.fits is False:
        raise ConfigError(refusal(plan))
    return plan
