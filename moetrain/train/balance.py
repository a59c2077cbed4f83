"""Load balancing across the micro-batches of one optimizer step.

Owns: the scope logic of the load-balancing loss (LBL), the z-loss, and the aux-loss-free
expert-bias update. The formulas themselves are pure functions in ``moetrain.losses``.

Per MoE layer, LBL = coeff * E * sum_i f_i * p_i (Megatron / DeepSpeed top-k convention; uniform
-> 1.0), with p_i the mean router probability over the *local* micro-batch and
f_i = count_i / (T * k) from:
- ``micro``: the local micro-batch only (the usual implementation);
- ``global``: counts all-reduced over the data-parallel group and accumulated over the
  micro-batches of the step so far (a running mean, as Megatron's global aux loss; "Demons in
  the Detail", Qwen), reset at each optimizer step. f carries no gradient;
- ``sequence``: per sequence (DeepSeek-V3 style), averaged over sequences.

Layers: the step's LBL and z-loss are **summed** over MoE layers (Megatron: every MoE layer adds
its own ``coeff * aux_loss``), so each layer's router feels the full coefficient whatever the
depth; a model with L MoE layers at uniform routing reports lbl = L * coeff.

Because each rank's loss is averaged over ranks, the ``global`` loss of N ranks equals the loss
one process computes on the concatenated global micro-batch.

Aux-loss-free bias (``model.moe.expert_bias``): once per step, with counts all-reduced once,
bias_i += rate * sign(mean(count) - count_i) — under-loaded experts become more attractive.
"""

from __future__ import annotations

import torch

from moetrain import losses
from moetrain.config import LossConfig, MoEConfig
from moetrain.parallel.context import ParallelContext


class LoadBalancer:
    def __init__(self, loss_cfg: LossConfig, moe_cfg: MoEConfig, num_moe_layers: int, ctx: ParallelContext):
        self.cfg, self.moe, self.ctx = loss_cfg, moe_cfg, ctx
        self.num_layers = num_moe_layers
        self.step_counts_LE = torch.zeros(num_moe_layers, moe_cfg.num_experts, device=ctx.device)
        self.step_tokens = 0  # global tokens routed this step (global scope) or local (else)
        self.local_counts_LE = torch.zeros_like(self.step_counts_LE)  # this rank's, any scope

    def start_step(self) -> None:
        self.step_counts_LE.zero_()
        self.local_counts_LE.zero_()
        self.step_tokens = 0

    def micro_losses(
        self, routing: list, batch_size: int, counts_LE: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(LBL, z-loss) of one micro-batch, each already multiplied by its coefficient and
        summed over MoE layers. Accumulates this micro-batch's counts: ``counts_LE`` (float32
        [L, E], ``losses.routing_counts`` of ``routing``, computed once by the caller for the
        statistics too; not modified), or computed here when None."""
        E, K = self.moe.num_experts, self.moe.top_k
        if counts_LE is None:
            counts_LE = losses.routing_counts([r.topk_ids_TK for r in routing], E)
        counts_LE = counts_LE.to(self.ctx.device)
        self.local_counts_LE += counts_LE
        T = routing[0].topk_ids_TK.shape[0]
        zero = torch.zeros((), device=self.ctx.device)
        lbl, zl = zero, zero
        scope = self.cfg.lbl_scope
        if scope == "global":
            counts_LE = self.ctx.all_reduce_sum(counts_LE.clone())  # one small all-reduce per micro-batch
            self.step_counts_LE += counts_LE
            self.step_tokens += T * self.ctx.world_size
        else:
            self.step_counts_LE += counts_LE
            self.step_tokens += T
        if self.cfg.lbl_coeff > 0:
            parts = []
            for idx, r in enumerate(routing):
                if scope == "global":
                    parts.append(losses.load_balancing_loss(r.scores_TE, self.step_counts_LE[idx], self.step_tokens, K))
                elif scope == "micro":
                    parts.append(losses.load_balancing_loss(r.scores_TE, counts_LE[idx], T, K))
                else:
                    S = T // batch_size
                    parts.append(
                        losses.sequence_load_balancing_loss(
                            r.scores_TE.view(batch_size, S, E), r.topk_ids_TK.view(batch_size, S, K), E, K
                        )
                    )
            lbl = self.cfg.lbl_coeff * torch.stack(parts).sum()
        if self.cfg.z_loss_coeff > 0:
            zl = self.cfg.z_loss_coeff * torch.stack([losses.z_loss(r.logits_TE) for r in routing]).sum()
        return lbl, zl

    def global_step_counts(self) -> torch.Tensor:
        """Tokens per expert per layer over the whole step and all ranks, [L, E] (the trainer gets
        the same figure by all-reducing :attr:`local_counts_LE` with the step's other sums)."""
        if self.cfg.lbl_scope == "global":  # already all-reduced per micro-batch
            return self.step_counts_LE.clone()
        return self.ctx.all_reduce_sum(self.step_counts_LE.clone())

    @torch.no_grad()
    def update_bias(self, moe_layers: list, counts_LE: torch.Tensor) -> None:
        """Aux-loss-free balancing from the step's global counts (``global_step_counts()``)."""
        if not self.moe.expert_bias:
            return
        delta_LE = torch.sign(counts_LE.mean(dim=1, keepdim=True) - counts_LE) * self.moe.bias_update_rate
        for idx, layer in enumerate(moe_layers):
            layer.router.expert_bias_E.add_(delta_LE[idx].to(layer.router.expert_bias_E.device))
