"""One rank's trainer: build the model for a placement, run optimizer steps, validate.

Owns: the training step of one rank — read this rank's slice of the global batch, run the
micro-batches (forward, LM loss + load balancing + z-loss, backward), reduce gradients to those of
the single-process model, clip, step AdamW with the warmup+cosine schedule, update the
aux-loss-free bias, and accumulate routing statistics. The same code runs on one process
(``ParallelContext()``: the reference) and on every rank of an expert-parallel group.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from moetrain import losses
from moetrain.config import RunConfig
from moetrain.data import BatchCursor, build_dataset, shard_global_batch, val_batches
from moetrain.model import Transformer, count_moe_blocks
from moetrain.parallel import grads
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dispatcher import AllToAllDispatcher, count_unit_sends
from moetrain.train.balance import LoadBalancer
from moetrain.train.checkpointer import RankCheckpointer, ResumePoint
from moetrain.train.metrics import StepMetrics
from moetrain.train.schedule import lr_at
from moetrain.train.stats import RoutingStatsAccumulator
from placement.placement import Placement
from placement.stats import RoutingStats


def initial_placement(cfg: RunConfig) -> Placement:
    """The placement a run starts from: contiguous, round-robin, or a JSON file."""
    L, E, R = count_moe_blocks(cfg.model), cfg.model.moe.num_experts, cfg.cluster.num_workers
    spr = cfg.placement.slots_per_rank or None
    kind = cfg.placement.initial
    if kind == "contiguous":
        return Placement.contiguous(L, E, R, spr)
    if kind == "round_robin":
        return Placement.round_robin(L, E, R, spr)
    from pathlib import Path
    from moetrain.config import ConfigError
    path = Path(kind)
    if not path.is_file():
        raise ConfigError(f"placement.initial ({kind!r}) is neither contiguous, round_robin nor a placement JSON file")
    p = Placement.from_json(path.read_text())
    if (p.num_layers, p.num_experts, p.num_ranks) != (L, E, R):
        raise ConfigError(f"placement.initial {kind!r} is for {p.num_layers} layers x {p.num_experts} experts x "
                          f"{p.num_ranks} ranks, the run has {L} x {E} x {R}")
    return p


def nonfinite_quantities(**values: float) -> tuple[str, ...]:
    """Names of the values that are NaN or infinite, e.g. ``("lm_loss", "grad_norm")``."""
    return tuple(name for name, v in values.items() if not math.isfinite(v))


class RankTrainer:
    def __init__(self, cfg: RunConfig, *, ctx: ParallelContext | None = None,
                 placement: Placement | None = None, dataset=None):
        self.cfg = cfg
        self.ctx = ctx or ParallelContext()
        self.data = dataset if dataset is not None else build_dataset(cfg.data)
        if cfg.model.vocab_size == 0:
            self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.data.vocab_size))
        self.placement = placement or initial_placement(self.cfg)
        if self.placement.num_ranks != self.ctx.world_size:
            raise ValueError(f"placement has {self.placement.num_ranks} ranks, the group has {self.ctx.world_size}")
        self.model = Transformer(self.cfg.model, seed=cfg.train.seed, placement=self.placement,
                                 rank=self.ctx.rank).to(self.ctx.device)
        self.moe_layers = self.model.moe_layers()
        self._install_dispatchers()
        self.dense_params = [p for _, p in self.model.dense_parameters()]
        self.all_params = [p for p in self.model.parameters()]
        decay = [p for p in self.all_params if p.ndim >= 2]
        no_decay = [p for p in self.all_params if p.ndim < 2]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
        self.cursor = BatchCursor(len(self.data.train.tokens_NT1), t.global_batch_size, seed=cfg.data.seed)
        self.balancer = LoadBalancer(t.loss, cfg.model.moe, len(self.moe_layers), self.ctx)
        p = cfg.placement
        self.stats = RoutingStatsAccumulator(
            len(self.moe_layers), cfg.model.moe.num_experts, cfg.model.moe.top_k, window=p.window,
            sample_tokens=-(-p.sample_tokens // self.ctx.world_size))  # this rank's share
        self.checkpointer = RankCheckpointer(self)
        self.step = 0

    def resume_from(self, point: ResumePoint) -> None:
        """Continue from a committed checkpoint: weights, AdamW state, data cursor and step."""
        self.checkpointer.load(point)
        self.cursor.load_state_dict(point.cursor)
        self.step = int(point.step)

    # ---- expert parallelism ------------------------------------------------------------------
    def _install_dispatchers(self) -> None:
        """Multi-rank: every MoE layer gets an all-to-all dispatcher for the current placement."""
        if not self.ctx.distributed:
            return
        moe = self.cfg.model.moe
        for idx, layer in enumerate(self.moe_layers):
            layer.dispatcher = AllToAllDispatcher(self.placement, idx, self.ctx,
                                                  capacity_factor=moe.capacity_factor, dedup=moe.dedup)

    # ---- training ----------------------------------------------------------------------------
    def _micro_batches(self) -> list[np.ndarray]:
        idx = self.cursor.next_indices()
        tokens = self.data.train.tokens_NT1[idx]
        return shard_global_batch(tokens, self.cfg.train.grad_accum_steps, self.ctx.world_size, self.ctx.rank)

    def train_step(self) -> StepMetrics:
        """One optimizer step. Returns metrics averaged over ranks (identical on every rank)."""
        t0 = time.perf_counter()
        t = self.cfg.train
        micro = self._micro_batches()
        A = len(micro)
        self.balancer.start_step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, device=self.ctx.device)  # lm, lbl, z, off-rank unit sends
        for mb in micro:
            x = torch.from_numpy(mb[:, :-1]).long().to(self.ctx.device)
            y = torch.from_numpy(mb[:, 1:]).long().to(self.ctx.device)
            logits, routing = self.model(x)
            lm = losses.lm_loss(logits, y)
            lbl, zl = self.balancer.micro_losses(routing, batch_size=x.shape[0])
            ((lm + lbl + zl) / A).backward()
            self.stats.add(routing)
            sums[:3] += torch.stack([lm.detach(), lbl.detach(), zl.detach()]) / A
            sums[3] += self._offrank_sends(routing)
        grads.sync_dense_grads(self.dense_params, self.ctx)
        grads.sync_expert_grads(self.moe_layers, self.placement, self.ctx)
        norm_t = grads.global_grad_norm(self.dense_params, self.moe_layers, self.placement, self.ctx)
        norm = float(norm_t)
        self.ctx.all_reduce_sum(sums)  # before the update: every rank decides alike on non-finite values
        lm, lbl, zl, sends = (sums[:3] / self.ctx.world_size).tolist() + [sums[3].item()]
        bad = nonfinite_quantities(lm_loss=lm, lbl=lbl, z_loss=zl, grad_norm=norm)
        lr = lr_at(self.step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
        load_LE = self.balancer.global_step_counts()  # one all-reduce in micro scope, none in global
        if bad:  # skip the update: nothing non-finite reaches the weights or the optimizer state
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if t.grad_clip > 0:
                grads.clip_grads_(self.all_params, norm_t, t.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.balancer.update_bias(self.moe_layers, load_LE)
        self.stats.end_step()
        self.step += 1
        return StepMetrics(step=self.step, loss=lm + lbl + zl, lm_loss=lm, lbl=lbl, z_loss=zl,
                           grad_norm=norm, lr=lr, tokens=t.global_batch_size * self.cfg.data.seq_len,
                           offrank_sends=sends, load_LE=load_LE.cpu().numpy(),
                           step_time_s=time.perf_counter() - t0, nonfinite=bad)

    def _offrank_sends(self, routing: list) -> float:
        if not self.ctx.distributed:
            return 0.0
        total = 0
        for layer, r in zip(self.moe_layers, routing):
            total += count_unit_sends(r.topk_ids_TK, layer.dispatcher)
        return float(total)

    # ---- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per domain (same value on every rank)."""
        self.model.eval()
        bs = self.cfg.train.global_batch_size // self.cfg.train.grad_accum_steps
        out = {}
        W = self.ctx.world_size
        for d, name in enumerate(self.data.domains):
            acc = torch.zeros(2, device=self.ctx.device)
            for batch in val_batches(self.data.val, name, bs, self.cfg.train.eval_batches):
                rows = (batch.shape[0] // W) * W
                if rows == 0:
                    continue
                mb = shard_global_batch(batch[:rows], 1, W, self.ctx.rank)[0]
                x = torch.from_numpy(mb[:, :-1]).long().to(self.ctx.device)
                y = torch.from_numpy(mb[:, 1:]).long().to(self.ctx.device)
                logits, _ = self.model(x)
                acc[0] += losses.lm_loss(logits, y) * y.numel()
                acc[1] += y.numel()
            self.ctx.all_reduce_sum(acc)
            out[name] = (acc[0] / acc[1]).item() if acc[1] > 0 else math.nan
        self.model.train()
        return out

    # ---- re-placement --------------------------------------------------------------------------
    def routing_stats(self) -> RoutingStats:
        """The statistics window, reduced over ranks, with this rank's id sample (collective)."""
        return self.stats.window_stats(self.ctx)

    def migrate(self, new_placement: Placement):
        """Move experts (weights + AdamW state) to ``new_placement`` at this step boundary
        (collective). Returns this rank's :class:`~moetrain.parallel.migrate.MigrationReport`."""
        from moetrain.parallel.migrate import migrate_experts

        self.checkpointer.fence()  # an overlapped checkpoint copy must finish before experts move
        report = migrate_experts(self.moe_layers, self.optimizer, self.placement, new_placement, self.ctx)
        self.placement = new_placement
        self._install_dispatchers()
        return report

    # ---- inspection ------------------------------------------------------------------------------
    @torch.no_grad()
    def export_tensors(self, kind: str = "param") -> dict[str, np.ndarray]:
        """Parameters (or gradients) keyed placement-independently: dense by name, experts as
        ``experts/<layer>/<expert>/<w>`` from their primary replica. For tests and debugging."""
        get = (lambda p: p.data) if kind == "param" else (lambda p: p.grad if p.grad is not None else torch.zeros_like(p))
        out = {f"dense/{n}": get(p).cpu().numpy().copy() for n, p in self.model.dense_parameters()}
        for idx, layer in enumerate(self.moe_layers):
            primary = grads.primary_slot_mask(self.placement, idx, self.ctx.rank)
            local = self.placement.local_experts(idx, self.ctx.rank)
            for name, p in zip(grads.EXPERT_PARAM_NAMES, grads.expert_params(layer)):
                t = get(p)
                for slot, e in enumerate(local):
                    if primary[slot]:
                        out[f"experts/{idx}/{int(e)}/{name}"] = t[slot].cpu().numpy().copy()
        return out
