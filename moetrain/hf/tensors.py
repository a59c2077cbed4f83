"""Which HF tensors make which moetrain tensor, with the expected shapes, and the conversions.

Owns: :func:`tensor_plan` (for an :class:`ArchSpec` and a :class:`ModelConfig`: one
:class:`TensorMap` per moetrain tensor, naming its HF source tensors and their shapes),
:func:`to_moetrain` / :func:`to_hf` (the only value transforms: q/k/v concatenated into the fused
``wqkv_QD`` (and ``bqkv_Q``), Ernie's interleaved rotary rows permuted to the half-split layout,
the ``[1, E]`` selection bias flattened), all exact (no arithmetic: concatenation, indexing,
reshape), so import then export gives the same bytes.

moetrain targets: ``dense:<parameter name>``, ``buffer:<buffer name>`` (both in ``dense.pt``) and
``expert:<moe layer>:<expert>:<w_gate_SFD|w_up_SFD|w_down_SDF>`` (one object per expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moetrain.config import ModelConfig
from moetrain.hf.arch import ArchSpec
from moetrain.model.transformer import is_moe_block

EXPERT_KEYS = ("w_gate_SFD", "w_up_SFD", "w_down_SDF")  # = moetrain.parallel.grads.EXPERT_PARAM_NAMES


@dataclass(frozen=True)
class TensorMap:
    target: str  # "dense:<name>" | "buffer:<name>" | "expert:<layer>:<expert>:<key>"
    sources: tuple[str, ...]  # HF tensor names
    shapes: tuple[tuple[int, ...], ...]  # expected shape of each source
    kind: str = "copy"  # copy | qkv (concatenate rows; rope-permute q and k if interleaved) | row (flatten [1, E])
    heads: tuple[int, ...] = ()  # qkv: heads of each source (for the rotary permutation)

    @property
    def kind_of_target(self) -> str:
        return self.target.split(":", 1)[0]


def _attention(spec: ArchSpec, cfg: ModelConfig, i: int) -> list[TensorMap]:
    D, H = cfg.dim, cfg.n_heads
    G, d = cfg.n_kv_heads or H, cfg.dim // H
    hf, mt = f"model.layers.{i}.self_attn", f"blocks.{i}.attn"
    qkv = tuple(f"{hf}.{p}_proj" for p in "qkv")
    out = [
        TensorMap(
            f"dense:{mt}.wqkv_QD",
            tuple(f"{n}.weight" for n in qkv),
            ((H * d, D), (G * d, D), (G * d, D)),
            "qkv",
            (H, G, G),
        ),
        TensorMap(f"dense:{mt}.wo_DD", (f"{hf}.o_proj.weight",), ((D, H * d),)),
    ]
    if cfg.qkv_bias:
        out.append(
            TensorMap(
                f"dense:{mt}.bqkv_Q", tuple(f"{n}.bias" for n in qkv), ((H * d,), (G * d,), (G * d,)), "qkv", (H, G, G)
            )
        )
    if cfg.qk_norm:
        out += [
            TensorMap(f"dense:{mt}.q_norm.weight_D", (f"{hf}.q_norm.weight",), ((H * d,),)),
            TensorMap(f"dense:{mt}.k_norm.weight_D", (f"{hf}.k_norm.weight",), ((G * d,),)),
        ]
    return out


def _swiglu(target: str, source: str, leaves: tuple[str, str, str], D: int, F: int) -> list[TensorMap]:
    shapes = ((F, D), (F, D), (D, F))
    return [
        TensorMap(f"{target}.{mt}", (f"{source}.{leaf}.weight",), (shape,))
        for mt, leaf, shape in zip(("w_gate_FD", "w_up_FD", "w_down_DF"), leaves, shapes)
    ]


def _moe(spec: ArchSpec, cfg: ModelConfig, i: int, layer: int) -> list[TensorMap]:
    moe, D = cfg.moe, cfg.dim
    hf, mt = f"model.layers.{i}.{spec.moe_module}", f"blocks.{i}.ffn"
    out = [TensorMap(f"dense:{mt}.router.gate_ED", (f"{hf}.gate.weight",), ((moe.num_experts, D),))]
    shared_dim = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    if shared_dim:
        out += _swiglu(
            f"dense:{mt}.shared", f"{hf}.{spec.shared_module}", ("gate_proj", "up_proj", "down_proj"), D, shared_dim
        )
    if shared_dim and moe.shared_expert_gate:
        out.append(TensorMap(f"dense:{mt}.shared_gate_1D", (f"{hf}.shared_expert_gate.weight",), ((1, D),)))
    if moe.expert_bias:
        out.append(
            TensorMap(
                f"buffer:{mt}.router.expert_bias_E",
                (f"{hf}.moe_statics.e_score_correction_bias",),
                ((1, moe.num_experts),),
                "row",
            )
        )
    F = moe.expert_ffn_dim
    for e in range(moe.num_experts):
        for key, leaf, shape in zip(EXPERT_KEYS, spec.expert_leaves, ((F, D), (F, D), (D, F))):
            out.append(TensorMap(f"expert:{layer}:{e}:{key}", (f"{hf}.experts.{e}.{leaf}.weight",), (shape,)))
    return out


def tensor_plan(spec: ArchSpec, cfg: ModelConfig) -> list[TensorMap]:
    """Every moetrain tensor of ``cfg`` as ``spec`` lays it out: dense ones in model order first,
    then each MoE layer's experts."""
    V, D = cfg.vocab_size, cfg.dim
    dense: list[TensorMap] = [TensorMap("dense:tok_embed_VD", ("model.embed_tokens.weight",), ((V, D),))]
    experts: list[TensorMap] = []
    layer = 0
    for i in range(cfg.n_layers):
        dense.append(
            TensorMap(f"dense:blocks.{i}.attn_norm.weight_D", (f"model.layers.{i}.input_layernorm.weight",), ((D,),))
        )
        dense += _attention(spec, cfg, i)
        dense.append(
            TensorMap(
                f"dense:blocks.{i}.ffn_norm.weight_D", (f"model.layers.{i}.post_attention_layernorm.weight",), ((D,),)
            )
        )
        if is_moe_block(cfg, i):
            for m in _moe(spec, cfg, i, layer):
                (experts if m.kind_of_target == "expert" else dense).append(m)
            layer += 1
        else:
            dense += _swiglu(
                f"dense:blocks.{i}.ffn", f"model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj"), D, cfg.ffn_dim
            )
    dense.append(TensorMap("dense:final_norm.weight_D", ("model.norm.weight",), ((D,),)))
    if not cfg.tie_embeddings:
        dense.append(TensorMap("dense:lm_head_VD", ("lm_head.weight",), ((V, D),)))
    return dense + experts


def _rope_perm(heads: int, d: int, inverse: bool) -> Tensor:
    """Row order taking interleaved rotary pairs (2i, 2i+1) to half-split (i, i + d/2), per head."""
    one = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    if inverse:
        one = torch.argsort(one)
    return (torch.arange(heads).unsqueeze(1) * d + one.unsqueeze(0)).reshape(-1)


def to_moetrain(m: TensorMap, tensors: list[Tensor], *, interleaved_rope: bool) -> Tensor:
    """The moetrain tensor of ``m`` from its HF sources (in ``m.sources`` order)."""
    if m.kind == "row":
        return tensors[0].reshape(-1)
    if m.kind != "qkv":
        return tensors[0]
    parts = list(tensors)
    if interleaved_rope:
        d = parts[0].shape[0] // m.heads[0]
        parts[:2] = [t.index_select(0, _rope_perm(h, d, False)) for t, h in zip(parts[:2], m.heads[:2])]
    return torch.cat(parts, dim=0)


def to_hf(m: TensorMap, value: Tensor, *, interleaved_rope: bool) -> list[Tensor]:
    """The HF source tensors of ``m`` from the moetrain tensor (inverse of :func:`to_moetrain`)."""
    if m.kind == "row":
        return [value.reshape(m.shapes[0])]
    if m.kind != "qkv":
        return [value]
    parts = list(value.split([s[0] for s in m.shapes], dim=0))
    if interleaved_rope:
        d = parts[0].shape[0] // m.heads[0]
        parts[:2] = [t.index_select(0, _rope_perm(h, d, True)) for t, h in zip(parts[:2], m.heads[:2])]
    return [p.contiguous() for p in parts]
