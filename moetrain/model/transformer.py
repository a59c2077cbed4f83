"""Decoder-only MoE transformer for one rank.

Owns: the block layout (which blocks are MoE), building the MoE layers with this rank's experts
from a :class:`Placement`, the placement-independent initialisation, the forward pass, and the
dense / expert parameter partition used for gradient reduction.

Initialisation (never touches the global RNG): every dense parameter is drawn, in the fixed
``named_parameters`` order, from ``torch.Generator().manual_seed(seed)``: norms = 1, output
projections (``wo_DD``, ``w_down_DF``) ~ N(0, (init_std / sqrt(2 * n_layers))^2), everything
else (embedding, QKV, gates/ups, router gates) ~ N(0, init_std^2). Routed experts draw from
their own generators (see ``experts.py``) with the same two stds. The dense order does not
depend on the placement, so every rank gets identical dense weights.

Shapes: B batch, T sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.config import ConfigError, ModelConfig, validate_model
from moetrain.model.attention import CausalSelfAttention, KVCache
from moetrain.model.checkpointing import check_mode, checkpoint_module, checkpointed
from moetrain.model.ffn import SwiGLU
from moetrain.model.moe.experts import GroupedExperts
from moetrain.model.moe.layer import MoELayer
from moetrain.model.moe.router import RouterOutput
from moetrain.model.norm import RMSNorm
from placement.placement import Placement

_OUTPUT_PROJECTIONS = ("wo_DD", "w_down_DF")
_ZERO_INIT = ("bqkv_Q",)  # biases start at zero (no draw from the generator)


def is_moe_block(cfg: ModelConfig, block_index: int) -> bool:
    """Block i is MoE iff i >= first_moe_layer and (i - first_moe_layer) % every_n_layers == 0."""
    moe = cfg.moe
    return block_index >= moe.first_moe_layer and (block_index - moe.first_moe_layer) % moe.every_n_layers == 0


def count_moe_blocks(cfg: ModelConfig) -> int:
    return sum(is_moe_block(cfg, i) for i in range(cfg.n_layers))


def check_placement(placement: Placement, num_moe_layers: int, num_experts: int, rank: int) -> None:
    if placement.num_layers != num_moe_layers:
        raise ConfigError(
            f"placement has {placement.num_layers} layers but the model has {num_moe_layers} "
            "MoE layers (model.n_layers / model.moe.every_n_layers / model.moe.first_moe_layer)"
        )
    if placement.num_experts != num_experts:
        raise ConfigError(f"placement has {placement.num_experts} experts but model.moe.num_experts is {num_experts}")
    if not 0 <= rank < placement.num_ranks:
        raise ConfigError(f"rank ({rank}) must be in [0, {placement.num_ranks}) for this placement")


@torch.no_grad()
def init_dense_(
    named_params: Iterable[tuple[str, nn.Parameter]], *, seed: int, init_std: float, out_std: float
) -> None:
    """Initialise dense parameters in the given order from one generator seeded with ``seed``:
    RMSNorm weights (``weight_D``) = 1, QKV biases = 0, output projections ~ N(0, out_std^2), others
    ~ N(0, init_std^2). In place; never touches the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight_D":
            p.fill_(1.0)
        elif leaf in _ZERO_INIT:
            p.zero_()
        else:
            std = out_std if leaf in _OUTPUT_PROJECTIONS else init_std
            p.copy_(torch.randn(p.shape, generator=gen).mul_(std))


class Block(nn.Module):
    """x + attn(norm(x)), then h + ffn(norm(h)); ffn is a dense SwiGLU or an MoE layer.

    ``checkpoint_attention`` / ``checkpoint_dense_ffn`` make those sub-blocks recomputed regions
    (see ``moetrain.model.checkpointing``); an MoE sub-block is never one as a whole."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = CausalSelfAttention(
            cfg.dim,
            cfg.n_heads,
            cfg.max_seq_len,
            cfg.rope_theta,
            n_kv_heads=cfg.n_kv_heads,
            qk_norm=cfg.qk_norm,
            qkv_bias=cfg.qkv_bias,
            norm_eps=cfg.norm_eps,
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = ffn
        self.checkpoint_attention = False
        self.checkpoint_dense_ffn = False

    def _attention(self, x_BTD: Tensor, cache: KVCache | None = None) -> Tensor:
        return self.attn(self.attn_norm(x_BTD), cache)

    def _dense_ffn(self, h_BTD: Tensor) -> Tensor:
        return self.ffn(self.ffn_norm(h_BTD))

    def forward(self, x_BTD: Tensor, cache: KVCache | None = None) -> tuple[Tensor, RouterOutput | None]:
        if cache is not None:  # inference: nothing is recomputed
            attn = self._attention(x_BTD, cache)
        else:
            attn = checkpointed(self._attention, x_BTD) if self.checkpoint_attention else self._attention(x_BTD)
        h_BTD = x_BTD + attn
        if isinstance(self.ffn, MoELayer):
            y_BTD, route = self.ffn(self.ffn_norm(h_BTD))
            return h_BTD + y_BTD, route
        ffn = checkpointed(self._dense_ffn, h_BTD) if self.checkpoint_dense_ffn else self._dense_ffn(h_BTD)
        return h_BTD + ffn, None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, seed: int, placement: Placement | None = None, rank: int = 0) -> None:
        super().__init__()
        validate_model(cfg, building=True)
        self.cfg = cfg
        E = cfg.moe.num_experts
        n_moe = count_moe_blocks(cfg)
        placement = placement if placement is not None else Placement.contiguous(n_moe, E, 1)
        check_placement(placement, n_moe, E, rank)
        self.placement, self.rank = placement, rank
        init_std = cfg.init_std
        out_std = init_std / math.sqrt(2 * cfg.n_layers)

        self.tok_embed_VD = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        blocks, moe_index = [], 0
        for i in range(cfg.n_layers):
            if is_moe_block(cfg, i):
                ffn: nn.Module = MoELayer(
                    cfg.dim,
                    cfg.moe,
                    layer_index=moe_index,
                    seed=seed,
                    local_experts=placement.local_experts(moe_index, rank).tolist(),
                    init_std=init_std,
                    out_std=out_std,
                )
                moe_index += 1
            else:
                ffn = SwiGLU(cfg.dim, cfg.ffn_dim)
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head_VD = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        init_dense_(self.dense_parameters(), seed=seed, init_std=init_std, out_std=out_std)

    # ---- structure -----------------------------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers())

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, param) of every routed-expert (GroupedExperts) parameter, in module order."""
        for mod_name, mod in self.named_modules():
            if isinstance(mod, GroupedExperts):
                yield from mod.named_parameters(prefix=mod_name)

    def dense_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, param) of every other parameter (attention, norms, dense FFNs, routers, shared
        experts, embeddings), in module order."""
        expert_ids = {id(p) for _, p in self.expert_parameters()}
        for name, p in self.named_parameters():
            if id(p) not in expert_ids:
                yield name, p

    def apply_activation_checkpointing(self, mode: str) -> None:
        """Mark the regions of ``train.activation_checkpointing`` (none | block | attention) as
        recomputed in backward; never a region with a collective (``moetrain.model.checkpointing``)."""
        check_mode(mode)
        if mode == "none":
            return
        for block in cast("list[Block]", self.blocks):
            block.checkpoint_attention = True
            if mode != "block":
                continue
            if not isinstance(block.ffn, MoELayer):
                block.checkpoint_dense_ffn = True
                continue
            checkpoint_module(block.ffn_norm)
            for part in (block.ffn.router, block.ffn.experts, block.ffn.shared):
                if part is not None:
                    checkpoint_module(part)

    # ---- forward -------------------------------------------------------------------------
    def new_kv_caches(self) -> list[KVCache]:
        """Empty key/value caches, one per block, for incremental decoding (``forward(caches=)``)."""
        return [KVCache() for _ in self.blocks]

    def forward(self, tokens_BT: Tensor, caches: list[KVCache] | None = None) -> tuple[Tensor, list[RouterOutput]]:
        """tokens_BT int64 -> (logits_BTV float32, one RouterOutput per MoE layer in order).
        ``caches`` (from :meth:`new_kv_caches`): tokens_BT continues the positions they hold."""
        x_BTD = F.embedding(tokens_BT, self.tok_embed_VD)
        routing: list[RouterOutput] = []
        for i, block in enumerate(self.blocks):
            x_BTD, route = block(x_BTD, caches[i] if caches is not None else None)
            if route is not None:
                routing.append(route)
        h_BTD = self.final_norm(x_BTD)
        head_VD = self.tok_embed_VD if self.lm_head_VD is None else self.lm_head_VD
        logits_BTV = F.linear(h_BTD, head_VD)
        return logits_BTV.float(), routing
