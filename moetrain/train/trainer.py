"""One rank's trainer: build the model for a placement, run optimizer steps, validate.

Owns: the training step of one rank — read this rank's slice of the global batch, run the
micro-batches (forward, LM loss + load balancing + z-loss, backward), reduce gradients to those of
the single-process model, clip, step AdamW with the warmup+cosine schedule, update the
aux-loss-free bias, and accumulate routing statistics. The same code runs on one process
(``ParallelContext()``: the reference) and on every rank of an expert-parallel group.

One routing path per step: each micro-batch's per-expert counts are computed once on the device
and shared by the load balancer and the routing statistics; the off-rank sends come from the
dispatch metadata (python ints the dispatcher already read). The host reads the device once per
MoE layer forward (the dispatcher's split sizes), once for the step's sums (losses, sends,
traffic and expert counts, all-reduced together) and once for the gradient norm;
tests/parallel/test_host_syncs.py pins that figure.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from moetrain import losses
from moetrain.config import RunConfig
from moetrain.data.assign import DomainRankMap, assign_rows, domain_rank_map
from moetrain.data.training import StreamingData, open_training_data
from moetrain.model import Transformer
from moetrain.parallel import grads
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.traffic import StepTraffic, TrafficCounter
from moetrain.train.balance import LoadBalancer
from moetrain.train.build import initial_placement, install_dispatchers
from moetrain.train.checkpointer import RankCheckpointer, ResumePoint
from moetrain.train.metrics import StepMetrics
from moetrain.precision import autocast, resolve_precision
from moetrain.train.schedule import lr_at
from moetrain.train.state import RankParts
from moetrain.train.stats import RoutingStatsAccumulator
from placement.placement import Placement
from placement.stats import RoutingStats

if TYPE_CHECKING:
    from moetrain.train.zero import DenseZero


def nonfinite_quantities(**values: float) -> tuple[str, ...]:
    """Names of the values that are NaN or infinite, e.g. ``("lm_loss", "grad_norm")``."""
    return tuple(name for name, v in values.items() if not math.isfinite(v))


def check_vocab(cfg: RunConfig, tokenizer_vocab: int) -> None:
    """A tokenizer whose ids reach past the embedding cannot feed this model."""
    if cfg.model.vocab_size and tokenizer_vocab > cfg.model.vocab_size:
        from moetrain.config import ConfigError

        raise ConfigError(
            f"tokenizer vocabulary ({tokenizer_vocab}, data.tokenizer={cfg.data.tokenizer!r}) does not "
            f"match the model: larger than model.vocab_size ({cfg.model.vocab_size})"
        )


class RankTrainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        ctx: ParallelContext | None = None,
        placement: Placement | None = None,
        dataset=None,
        load_init_weights: bool = True,
    ):
        """``load_init_weights=False`` skips reading ``model.init_from``'s weights (its shape still
        applies): a resumed rank overwrites every weight from its checkpoint anyway."""
        from moetrain.hf.load import resolve_init_from

        cfg = resolve_init_from(cfg)  # model.init_from=hf:DIR: the model's shape is DIR's
        self.cfg = cfg
        self.ctx = ctx or ParallelContext()
        self.data: StreamingData = (
            dataset if dataset is not None else open_training_data(cfg.data, cfg.train.global_batch_size, cfg.storage)
        )
        check_vocab(cfg, self.data.vocab_size)
        if cfg.model.vocab_size == 0:
            self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.data.vocab_size))
        self.placement = placement or initial_placement(self.cfg)
        if self.placement.num_ranks != self.ctx.world_size:
            raise ValueError(f"placement has {self.placement.num_ranks} ranks, the group has {self.ctx.world_size}")
        # bf16 where it is not native fails here, on every rank, before any step (ConfigError).
        self.compute_dtype = resolve_precision(cfg.train.precision, self.ctx.device)
        self.model = self._build_model(load_init_weights)
        self.moe_layers = self.model.moe_layers()
        # bytes this rank sends, by kind and link (moetrain.parallel.traffic); drained every step
        self.traffic = TrafficCounter(self.ctx.rank, self.ctx.world_size, self.ctx.node_R, len(self.moe_layers))
        self._install_dispatchers()
        self.dense_params = [p for _, p in self.model.dense_parameters()]
        self.all_params = [p for p in self.model.parameters()]
        self.dense_zero = self._build_dense_zero()  # DeepSpeed ZeRO of the dense parameters, or None
        self.optimizer = self._build_optimizer()
        self.cursor = self.data.cursor  # exact save / restore of the data position (checkpoints)
        self.rank_map = self._rank_map()
        self.balancer = LoadBalancer(cfg.train.loss, cfg.model.moe, len(self.moe_layers), self.ctx)
        p = cfg.placement
        self.stats = RoutingStatsAccumulator(
            len(self.moe_layers),
            cfg.model.moe.num_experts,
            cfg.model.moe.top_k,
            window=p.window,
            sample_tokens=-(-p.sample_tokens // self.ctx.world_size),
        )  # this rank's share
        self.step = 0
        # Where the step in progress is (RankTrainer.step_status): idle -> computing -> synced
        # (every gradient collective done here) -> reduced (the global norm known: the rest is
        # local) -> applied -> idle at step + 1. ``fault_hook(phase, completed steps)`` runs at each
        # (fault injection: tests kill a rank at a chosen phase).
        self.phase = "idle"
        self.fault_hook: Callable[[str, int], None] | None = None
        self.last_norm = float("nan")  # the global gradient norm of the last reduced step
        self._boundary_cursor: dict | None = None  # the data position where the step began
        self._pending: tuple | None = None  # (lr, losses, load_LE) of the step in progress
        self._step_lock = threading.Lock()  # the update happens once: here, or by roll_forward
        self.checkpointer = self._build_checkpointer()

    def _build_model(self, load_init_weights: bool) -> Transformer:
        """This rank's model for the placement (the dense part and its own experts) with
        ``model.init_from``'s weights (unless ``load_init_weights`` is False), on the device, with
        the configured activation checkpointing."""
        from moetrain.hf.load import hf_dir_of, load_hf_weights

        cfg = self.cfg
        model = Transformer(cfg.model, seed=cfg.train.seed, placement=self.placement, rank=self.ctx.rank)
        if load_init_weights and hf_dir_of(cfg.model.init_from):  # dense weights + only this rank's experts
            load_hf_weights(model, hf_dir_of(cfg.model.init_from), cfg.storage)
        model = model.to(self.ctx.device)
        model.apply_activation_checkpointing(cfg.train.activation_checkpointing)
        return model

    def _build_dense_zero(self) -> DenseZero | None:
        """DeepSpeed's ZeRO optimizer of the dense parameters (``train.zero_stage`` 1 or 2), else None."""
        t = self.cfg.train
        if t.zero_stage <= 0:
            return None
        from moetrain.train.zero import DenseZero

        return DenseZero(
            list(self.model.dense_parameters()),
            stage=t.zero_stage,
            lr=t.lr,
            beta1=t.beta1,
            beta2=t.beta2,
            weight_decay=t.weight_decay,
            grad_clip=t.grad_clip,
            world_size=self.ctx.world_size,
            device=self.ctx.device,
        )

    def _build_optimizer(self) -> torch.optim.AdamW:
        """The local AdamW: of every parameter (ZeRO stage 0) or of the expert parameters (ZeRO);
        weight decay on the matrices only."""
        t = self.cfg.train
        local = self.all_params if self.dense_zero is None else [p for _, p in self.model.expert_parameters()]
        decay = [p for p in local if p.ndim >= 2]
        no_decay = [p for p in local if p.ndim < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            fused=True,
        )

    def _build_checkpointer(self) -> RankCheckpointer:
        """Saves and loads this rank's part of a checkpoint (model, AdamW, ZeRO state, data cursor)."""
        parts = RankParts(
            model=self.model,
            optimizer=self.optimizer,
            dense_zero=self.dense_zero,
            cursor=self.cursor,
            rank=self.ctx.rank,
        )
        cfg = self.cfg
        return RankCheckpointer(
            parts,
            step=lambda: self.step,
            placement=lambda: self.placement,
            traffic=self.traffic,
            cfg=cfg.checkpoint,
            storage=cfg.storage,
            run_name=cfg.cluster.run_name,
        )

    def resume_from(self, point: ResumePoint) -> None:
        """Continue from a committed checkpoint: weights, AdamW state, data cursor and step."""
        self.checkpointer.load(point)
        self.cursor.load_state_dict(point.cursor)
        self.step = int(point.step)

    # ---- expert parallelism ------------------------------------------------------------------
    def _install_dispatchers(self) -> None:
        install_dispatchers(self.moe_layers, self.placement, self.ctx, self.cfg.model.moe, traffic=self.traffic)

    # ---- training ----------------------------------------------------------------------------
    def _rank_map(self) -> DomainRankMap | None:
        """``data.rank_assignment=domain``: the stable domain -> rank map from the domains' token
        shares in a global batch (the mixture; rows are fixed-length, so rows count tokens)."""
        if self.cfg.data.rank_assignment != "domain":
            return None
        return domain_rank_map(tuple(self.data.domains), self.data.shares_D, self.ctx.world_size)

    def _micro_batches(self) -> list[np.ndarray]:
        M, W = self.cfg.train.grad_accum_steps, self.ctx.world_size
        reorder = None
        if self.rank_map is not None:  # same rows per micro-batch, domain-sorted over the ranks
            reorder = lambda dom_B: assign_rows(dom_B, M, W, self.rank_map)  # noqa: E731
        return self.data.next_micro_batches(M, W, self.ctx.rank, reorder)

    def train_step(self) -> StepMetrics:
        """One optimizer step. Returns metrics averaged over ranks (identical on every rank)."""
        t0 = time.perf_counter()
        t = self.cfg.train
        self._boundary_cursor = self.cursor.state_dict()
        self._enter("computing")
        micro = self._micro_batches()
        self.balancer.start_step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dense_zero is not None:
            self.dense_zero.zero_grad()
        losses_3, local_sends = self._forward_backward(micro)
        self._count_grad_traffic()
        grads.sync_expert_grads(self.moe_layers, self.placement, self.ctx)
        lm, lbl, zl, sends, load_LE, traffic = self._step_sums(losses_3, local_sends)
        lr = lr_at(self.step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
        self._pending = (lr, {"lm_loss": lm, "lbl": lbl, "z_loss": zl}, load_LE)
        norm, bad = self._update(lr, lm_loss=lm, lbl=lbl, z_loss=zl)
        self._end_step(bad, load_LE)
        return StepMetrics(
            step=self.step,
            loss=lm + lbl + zl,
            lm_loss=lm,
            lbl=lbl,
            z_loss=zl,
            grad_norm=norm,
            lr=lr,
            tokens=t.global_batch_size * self.cfg.data.seq_len,
            offrank_sends=sends,
            load_LE=load_LE,
            traffic=traffic,
            step_time_s=time.perf_counter() - t0,
            nonfinite=bad,
            world_size=self.ctx.world_size,
        )

    def _enter(self, phase: str) -> None:
        self.phase = phase
        if self.fault_hook is not None:
            self.fault_hook(phase, self.step)

    def _end_step(self, bad: tuple[str, ...], load_LE: np.ndarray) -> None:
        """After the update (or its skip): the expert bias, the statistics, the step count."""
        if bad:  # skip the update: nothing non-finite reaches the weights or the optimizer state
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.balancer.update_bias(self.moe_layers, torch.from_numpy(load_LE).to(self.ctx.device))
        self.stats.end_step()
        self._enter("applied")
        self.step += 1
        self.phase = "idle"

    # ---- recovery from memory (cluster.elastic) -----------------------------------------------
    def step_status(self) -> dict:
        """``{"step": completed steps, "phase": where the next one is, "norm": the last global
        gradient norm}``. A rank past ``synced`` holds every gradient of the step; one past
        ``reduced`` applies the update without further communication."""
        return {"step": self.step, "phase": self.phase, "norm": self.last_norm}

    def roll_forward(self, norm: float) -> None:
        """Finish a step whose gradient collectives all completed (phase ``synced``) but whose
        norm all-reduce was cut by a lost rank, with the ``norm`` a rank that completed it saw:
        the same update that rank applied (stage 0 only)."""
        with self._step_lock:
            if self.phase != "synced" or self._pending is None or self.dense_zero is not None:
                raise RuntimeError(f"cannot roll step {self.step + 1} forward from phase {self.phase}")
            self.phase = "reduced"
        lr, losses_3, load_LE = self._pending
        bad = nonfinite_quantities(**losses_3, grad_norm=norm)
        if not bad:
            self._local_update(self.all_params, torch.tensor(norm, dtype=torch.float32, device=self.ctx.device), lr)
        self.last_norm = norm
        self._end_step(bad, load_LE)

    def boundary_cursor(self) -> dict:
        """The data position at the last step boundary (where a step cut short began)."""
        if self.phase in ("computing", "synced") and self._boundary_cursor is not None:
            return self._boundary_cursor
        return self.cursor.state_dict()

    def _forward_backward(self, micro: list[np.ndarray]) -> tuple[torch.Tensor, int]:
        """Forward and backward of every micro-batch, accumulating the gradients and the routing
        statistics. Returns the lm, lbl and z losses, each the mean over the micro-batches, kept
        on the device (float64 [3]), and this rank's off-rank sends (a python int from the
        dispatch metadata): nothing here reads the device beyond the dispatchers' split sizes."""
        A = len(micro)
        losses_3 = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        sends = 0
        E = self.cfg.model.moe.num_experts
        for mb in micro:
            x = torch.from_numpy(mb[:, :-1]).long().to(self.ctx.device)
            y = torch.from_numpy(mb[:, 1:]).long().to(self.ctx.device)
            logits, routing = self._forward(x)
            counts_LE = losses.routing_counts([r.topk_ids_TK for r in routing], E)  # once, on the device
            lm = losses.lm_loss(logits, y)
            lbl, zl = self.balancer.micro_losses(routing, batch_size=x.shape[0], counts_LE=counts_LE)
            self._backward((lm + lbl + zl) / A)
            self.stats.add(routing, counts_LE)
            losses_3 += torch.stack([lm.detach(), lbl.detach(), zl.detach()]) / A
            sends += sum(r.sent.offrank for r in routing if r.sent is not None)
        return losses_3, sends

    def _step_sums(
        self, losses_3: torch.Tensor, sends: int
    ) -> tuple[float, float, float, float, np.ndarray, StepTraffic]:
        """One all-reduce and one host read for the step: losses, sends, the step's expert counts
        and the traffic (float64: counts and bytes stay exact); before the update, so every rank
        decides alike on non-finite values. Returns (lm, lbl, z) averaged over the ranks, the
        off-rank sends, the expert load [L, E] and the traffic, summed over the ranks."""
        L, E = len(self.moe_layers), self.cfg.model.moe.num_experts
        sums = torch.cat(
            [
                losses_3,
                torch.tensor([float(sends)], dtype=torch.float64, device=self.ctx.device),
                self.balancer.local_counts_LE.reshape(-1).double(),
                self.traffic.drain().to(self.ctx.device),
            ]
        )
        vals = self.ctx.all_reduce_sum(sums).tolist()
        lm, lbl, zl = [v / self.ctx.world_size for v in vals[:3]]
        load_LE = np.asarray(vals[4 : 4 + L * E], dtype=np.float32).reshape(L, E)  # all ranks, all micro-batches
        return lm, lbl, zl, vals[3], load_LE, self.traffic.decode(vals[4 + L * E :])

    def _update(self, lr: float, **losses: float) -> tuple[float, tuple[str, ...]]:
        """Reduce the gradients, take the global norm, clip and step unless a loss or the norm is
        non-finite. Returns the norm and the names of the non-finite quantities (identical on
        every rank: the losses and the norm are all-reduced)."""
        if self.dense_zero is None:
            grads.sync_dense_grads(self.dense_params, self.ctx)
            self._enter("synced")
            norm_t = grads.global_grad_norm(self.dense_params, self.moe_layers, self.placement, self.ctx)
            norm = float(norm_t)  # the host read of the norm
            with self._step_lock:
                if self.phase != "synced":  # rolled forward meanwhile (a recovery from memory)
                    raise RuntimeError(f"step {self.step + 1} was completed by roll_forward")
                self.last_norm = norm
                self._enter("reduced")
            bad = nonfinite_quantities(**losses, grad_norm=norm)
            if not bad:
                self._local_update(self.all_params, norm_t, lr)
            return norm, bad
        # ZeRO: DeepSpeed reduces the dense gradients, clips its slices by the global norm (dense
        # + experts) and updates them, or skips on every rank when we ask or the norm is not finite
        expert_sq = grads.expert_grad_sq(self.moe_layers, self.placement, self.ctx)
        norm, applied = self.dense_zero.step(lr=lr, expert_sq=expert_sq, skip=bool(nonfinite_quantities(**losses)))
        bad = nonfinite_quantities(**losses, grad_norm=norm)
        if applied:
            norm_t = torch.tensor(norm, dtype=torch.float32, device=self.ctx.device)
            self._local_update([p for _, p in self.model.expert_parameters()], norm_t, lr)
        return norm, bad

    def _backward(self, loss: torch.Tensor) -> None:
        if self.dense_zero is None:
            loss.backward()
        else:  # DeepSpeed's engine runs the backward (its ZeRO-2 hooks reduce dense gradients)
            self.dense_zero.backward(loss)

    def _local_update(self, params: list, norm_t: torch.Tensor, lr: float) -> None:
        """Clip ``params`` by the global norm and step the local AdamW."""
        if self.cfg.train.grad_clip > 0:
            grads.clip_grads_(params, norm_t, self.cfg.train.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def _forward(self, x_BT: torch.Tensor):
        """The model's forward in the run's precision: matmuls in ``compute_dtype`` (autocast),
        router in fp32; logits come back fp32 and every loss is computed outside, in fp32."""
        with autocast(self.compute_dtype, self.ctx.device):
            return self.model(x_BT)

    def _count_grad_traffic(self) -> None:
        """Estimates (moetrain.parallel.traffic) of this step's gradient collectives: the dense
        gradients (over the nodes' leaders on several nodes; ZeRO's reduce-scatter + all-gather:
        the bytes of a ring) and the replica reduction of every layer with a replicated expert."""
        if not self.ctx.distributed:
            return
        dense = sum(p.numel() * p.element_size() for p in self.dense_params)
        if self.ctx.nodes is not None and self.dense_zero is None:  # ParallelContext.all_reduce_dense
            self.traffic.add_node_allreduce("dense_grads", dense, self.ctx.node_R)
        else:
            self.traffic.add_ring_allreduce("dense_grads", dense)
        logcnt = self.placement.logcnt_LE
        for idx, layer in enumerate(self.moe_layers):
            if (logcnt[idx] > 1).any():
                nbytes = sum(
                    self.placement.num_experts * p[0].numel() * p.element_size() for p in grads.expert_params(layer)
                )
                self.traffic.add_ring_allreduce("expert_grads", nbytes)

    # ---- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per domain (same value on every rank)."""
        self.model.eval()
        bs = self.cfg.train.global_batch_size // self.cfg.train.grad_accum_steps
        out = {}
        W = self.ctx.world_size
        for name in self.data.domains:
            acc = torch.zeros(2, device=self.ctx.device)
            for mb in self.data.val_batches(name, bs, self.cfg.train.eval_batches, W, self.ctx.rank):
                x = torch.from_numpy(mb[:, :-1]).long().to(self.ctx.device)
                y = torch.from_numpy(mb[:, 1:]).long().to(self.ctx.device)
                logits, _ = self._forward(x)
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
        self.traffic.add_peer("migration", list(report.bytes_sent_R))  # in the next step's metrics
        self.placement = new_placement
        self._install_dispatchers()
        return report

    # ---- inspection ------------------------------------------------------------------------------
    @torch.no_grad()
    def export_tensors(self, kind: str = "param") -> dict[str, np.ndarray]:
        """Parameters (or gradients) keyed placement-independently: dense by name, experts as
        ``experts/<layer>/<expert>/<w>`` from their primary replica. For tests and debugging."""
        get = (
            (lambda p: p.data) if kind == "param" else (lambda p: p.grad if p.grad is not None else torch.zeros_like(p))
        )
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
