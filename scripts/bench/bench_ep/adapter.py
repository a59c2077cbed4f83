"""Every use the benchmark makes of moetrain's training internals, in one place, through public
APIs only: the trainer's :func:`~moetrain.train.trainer.install_dispatchers` wires the
expert-parallel dispatchers, and :mod:`moetrain.parallel.grads` synchronises the gradients between
backward and the optimizer step (the functions ``RankTrainer.train_step`` calls)."""

from __future__ import annotations

import torch


def attach_dispatchers(moe_layers, placement, ctx, capacity_factor: float = 0.0, dedup: bool = True,
                       chunks: int = 1, clock=None) -> None:
    """Give MoE layer i (of ``moe_layers``, in placement layer order) an all-to-all dispatcher for
    ``placement`` layer i (on more than one rank), as the trainer does; ``chunks`` > 1
    pipelines the all-to-all with the expert compute, ``clock`` (a ``CommClock``) times it."""
    from moetrain.config import MoEConfig
    from moetrain.train.trainer import install_dispatchers
    moe = MoEConfig(num_experts=placement.num_experts, capacity_factor=capacity_factor, dedup=dedup,
                    a2a_chunks=chunks)
    install_dispatchers(moe_layers, placement, ctx, moe, clock=clock)


def moetrain_grad_sync(model, placement, ctx):
    """``sync()`` for a moetrain ``Transformer``: dense gradients averaged over ranks, expert
    gradients summed over replicas and scaled, as ``RankTrainer.train_step`` does."""
    from moetrain.parallel import grads
    dense = [p for _, p in model.dense_parameters()]
    moe_layers = model.moe_layers()

    def sync():
        grads.sync_dense_grads(dense, ctx)
        grads.sync_expert_grads(moe_layers, placement, ctx)
    return sync


def dense_and_scaled_grad_sync(params: list[torch.nn.Parameter], ctx, ws: int):
    """``sync()`` for a model with DeepSpeed MoE layers: parameters without ``allreduce=False``
    (DeepSpeed's mark for expert weights) are averaged over ranks like moetrain's dense ones;
    expert gradients are divided by the world size, the scaling moetrain gives its experts."""
    from moetrain.parallel import grads
    dense = [p for p in params if getattr(p, "allreduce", True)]
    expert = [p for p in params if not getattr(p, "allreduce", True)]

    def sync():
        grads.sync_dense_grads(dense, ctx)
        for p in expert:
            if p.grad is not None:
                p.grad.div_(ws)
    return sync
