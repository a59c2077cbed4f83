"""One MoE feed-forward layer: route, dispatch, compute, combine (+ shared experts).

Owns: the wiring of router, dispatcher, routed experts and optional always-on shared experts
(one SwiGLU of width ``num_shared_experts * (shared_expert_ffn_dim or expert_ffn_dim)``,
optionally scaled per token by ``sigmoid(x . shared_gate_1D)``, Qwen2-MoE's shared-expert gate).
The dispatcher is a plain attribute (not a submodule): the trainer swaps in an expert-parallel
one with ``layer.dispatcher = ...``. By default it is a :class:`LocalDispatcher` when this rank
holds every expert, else None (forward then asks for a dispatcher).

Shapes: B batch, T tokens (B*T flattened inside), D model dim, N dispatched rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.config import MoEConfig
from moetrain.model.ffn import SwiGLU
from moetrain.model.moe.dispatcher import Dispatcher, LocalDispatcher, dispatch_compute_combine
from moetrain.model.moe.experts import GroupedExperts
from moetrain.model.moe.router import RouterOutput, TopKRouter


class MoELayer(nn.Module):
    def __init__(
        self,
        dim: int,
        moe_cfg: MoEConfig,
        *,
        layer_index: int,
        seed: int,
        local_experts: Sequence[int],
        init_std: float,
        out_std: float | None = None,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.router = TopKRouter(dim, moe_cfg)
        self.experts = GroupedExperts(
            local_experts,
            dim,
            moe_cfg.expert_ffn_dim,
            seed=seed,
            layer_index=layer_index,
            init_std=init_std,
            out_std=out_std,
        )
        shared_dim = moe_cfg.num_shared_experts * (moe_cfg.shared_expert_ffn_dim or moe_cfg.expert_ffn_dim)
        self.shared = SwiGLU(dim, shared_dim) if shared_dim > 0 else None
        # Qwen2-MoE: shared output scaled by sigmoid(x . w), one scalar per token
        gated = self.shared is not None and moe_cfg.shared_expert_gate
        self.shared_gate_1D = nn.Parameter(torch.zeros(1, dim)) if gated else None
        holds_all = set(range(moe_cfg.num_experts)) <= set(self.experts.local_experts)
        self.dispatcher: Dispatcher | None = (
            LocalDispatcher(self.experts.local_experts, moe_cfg.num_experts, moe_cfg.capacity_factor)
            if holds_all
            else None
        )

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, RouterOutput]:
        if self.dispatcher is None:
            raise RuntimeError(
                f"MoE layer {self.layer_index} holds experts {list(self.experts.local_experts)} only: "
                "assign an expert-parallel dispatcher (layer.dispatcher = ...) before forward"
            )
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        route = self.router(x_TD)
        out_TD, meta = dispatch_compute_combine(
            self.dispatcher, x_TD, route.topk_ids_TK, route.topk_weights_TK, self.experts
        )
        out_TD = out_TD.to(x_TD.dtype)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate_1D is not None:
                shared_TD = torch.sigmoid(F.linear(x_TD, self.shared_gate_1D)) * shared_TD
            out_TD = out_TD + shared_TD
        return out_TD.view(B, T, D), dataclasses.replace(route, num_dropped=meta.num_dropped, sent=meta.sent_rows())
