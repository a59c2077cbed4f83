"""The Hugging Face architectures moetrain reads and writes, and their config mapping.

Owns: :data:`ARCHS` (one :class:`ArchSpec` per supported ``model_type``: where its tensors live
and how its MoE routes), :func:`model_config_from_hf` (an HF ``config.json`` dict -> moetrain
:class:`ModelConfig`, refusing every field value moetrain cannot express, naming it; the
context: ``max_position_embeddings`` for an import, the run's ``max_seq_len`` up to it for a
fine-tune, see :func:`context_of`; bos / eos / pad ids inside the vocabulary) and
:func:`hf_config_from_model` (the reverse, on top of the imported ``config.json`` when known).

Supported (transformers 5.24 classes; all use SwiGLU experts, RMSNorm, RoPE, causal attention):

- ``mixtral`` (MixtralForCausalLM): GQA; softmax over all experts, top-k, renormalised, which
  is ``router=topk_softmax``; no shared experts, every layer MoE.
- ``qwen2_moe`` (Qwen2MoeForCausalLM, = Qwen1.5-MoE): QKV bias; softmax -> top-k, renormalised
  iff ``norm_topk_prob``; one shared expert of its own width scaled by ``sigmoid(x . w)``;
  dense first layers via ``mlp_only_layers = [0 .. k-1]``.
- ``olmoe`` (OlmoeForCausalLM): RMSNorm over the whole q and k projections; softmax -> top-k,
  renormalised iff ``norm_topk_prob``.
- ``ernie4_5_moe`` (Ernie4_5_MoeForCausalLM): the DeepSeek-MoE layout with standard attention
  (GQA): fine-grained experts, ungated shared experts of the expert width, dense first layers
  (``moe_layer_start_index``), tied embeddings; softmax -> top-k on scores + a per-expert
  selection bias (``e_score_correction_bias``, moetrain's ``expert_bias``) -> renormalised.
  Its rotary pairs are interleaved ``(2i, 2i+1)``; moetrain's are half-split ``(i, i + d/2)``,
  so q/k projection rows are permuted per head on the way in and back on the way out (the
  attention scores are unchanged). DeepseekV2/V3 use multi-head latent attention (MLA) and the
  original DeepSeek-MoE 16B is remote code only, so Ernie 4.5 is the in-library class with
  this layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moetrain.config import ModelConfig
from moetrain.hf.errors import HFError

# The context of a config.json without max_position_embeddings (an import's model.max_seq_len;
# the import says so). With the field, an import's context is max_position_embeddings and a
# fine-tune's model.max_seq_len may not exceed it.
DEFAULT_CONTEXT = 4096
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # checked against vocab_size


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    architecture: str  # the transformers class in config.json "architectures"
    moe_module: str  # "block_sparse_moe" (Mixtral) or "mlp"
    expert_leaves: tuple[str, str, str]  # HF names of an expert's gate, up, down projections
    shared_module: str = ""  # "shared_expert" | "shared_experts" | "" (none)
    interleaved_rope: bool = False  # rotary pairs (2i, 2i+1): permute q/k rows (Ernie)


ARCHS: dict[str, ArchSpec] = {
    "mixtral": ArchSpec("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ArchSpec(
        "qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), shared_module="shared_expert"
    ),
    "olmoe": ArchSpec("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "ernie4_5_moe": ArchSpec(
        "ernie4_5_moe",
        "Ernie4_5_MoeForCausalLM",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        shared_module="shared_experts",
        interleaved_rope=True,
    ),
}
SUPPORTED = ", ".join(f"{s.model_type} ({s.architecture})" for s in ARCHS.values())


def arch_of(hf: dict[str, Any], where: str = "config.json") -> ArchSpec:
    model_type = hf.get("model_type")
    if model_type not in ARCHS:
        names = hf.get("architectures") or []
        shown = f"{model_type!r}" + (f" ({', '.join(names)})" if names else "")
        raise HFError(f"{where}: unsupported architecture {shown}; supported: {SUPPORTED}")
    return ARCHS[model_type]


# ---- HF config -> ModelConfig -----------------------------------------------------------------


class _Reader:
    """Reads fields of one HF config dict; ``refuse`` names a field moetrain cannot express."""

    def __init__(self, hf: dict[str, Any], where: str, context: int) -> None:
        self.hf, self.where = hf, where
        self.context = context  # the model.max_seq_len the config is read for

    def get(self, key: str, default: Any = None) -> Any:
        value = self.hf.get(key, default)
        return default if value is None and default is not None else value

    def need(self, key: str) -> Any:
        if self.hf.get(key) is None:
            raise HFError(f"{self.where}: field {key!r} is missing")
        return self.hf[key]

    def refuse(self, key: str, value: Any, why: str) -> None:
        raise HFError(f"{self.where}: field {key}={value!r} cannot be expressed in moetrain ({why})")

    def expect(self, key: str, ok: bool, why: str) -> None:
        if not ok:
            self.refuse(key, self.hf.get(key), why)


def _rope_theta(r: _Reader) -> float:
    params = r.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        r.refuse("rope_parameters.rope_type", rope_type, "only plain RoPE ('default') is implemented")
    if r.get("rope_scaling"):
        r.refuse("rope_scaling", r.get("rope_scaling"), "RoPE scaling is not implemented")
    return float(params.get("rope_theta", r.get("rope_theta", 10000.0)))


def _common(r: _Reader) -> dict[str, Any]:
    dim, heads = int(r.need("hidden_size")), int(r.need("num_attention_heads"))
    r.expect("hidden_act", r.get("hidden_act", "silu") == "silu", "experts and FFNs are SwiGLU (silu)")
    head_dim = r.get("head_dim")
    r.expect(
        "head_dim",
        head_dim in (None, dim // heads),
        f"head dim must be hidden_size / num_attention_heads = {dim // heads}",
    )
    kv = int(r.get("num_key_value_heads", heads))
    return dict(
        vocab_size=int(r.need("vocab_size")),
        dim=dim,
        n_layers=int(r.need("num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=0 if kv == heads else kv,
        rope_theta=_rope_theta(r),
        norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        max_seq_len=r.context,
    )


def _sliding_window(r: _Reader) -> None:
    """A window not shorter than the context never hides a key: accepted; a shorter one is not."""
    window = r.get("sliding_window")
    r.expect(
        "sliding_window",
        window is None or int(window) >= r.context,
        f"sliding-window attention is not implemented; a window >= the context ({r.context}) is accepted",
    )


def _mixtral(r: _Reader) -> tuple[dict, dict]:
    _sliding_window(r)
    r.expect("router_jitter_noise", not r.get("router_jitter_noise", 0.0), "no router jitter")
    ffn = int(r.need("intermediate_size"))
    return (
        dict(ffn_dim=ffn),
        dict(
            num_experts=int(r.need("num_local_experts")),
            top_k=int(r.need("num_experts_per_tok")),
            expert_ffn_dim=ffn,
            router="topk_softmax",
            renormalize=True,
        ),
    )


def _qwen2_moe(r: _Reader) -> tuple[dict, dict]:
    if r.get("use_sliding_window", False):
        _sliding_window(r)
    r.expect(
        "decoder_sparse_step", int(r.get("decoder_sparse_step", 1)) == 1, "MoE every layer after the dense first ones"
    )
    dense = sorted(int(i) for i in r.get("mlp_only_layers", []) or [])
    r.expect("mlp_only_layers", dense == list(range(len(dense))), "dense layers must be the first k layers")
    shared = int(r.get("shared_expert_intermediate_size", 0))
    return (
        dict(ffn_dim=int(r.need("intermediate_size")), qkv_bias=bool(r.get("qkv_bias", True))),
        dict(
            num_experts=int(r.need("num_experts")),
            top_k=int(r.need("num_experts_per_tok")),
            expert_ffn_dim=int(r.need("moe_intermediate_size")),
            renormalize=bool(r.get("norm_topk_prob", False)),
            first_moe_layer=len(dense),
            num_shared_experts=1 if shared else 0,
            shared_expert_ffn_dim=shared,
            shared_expert_gate=bool(shared),
        ),
    )


def _olmoe(r: _Reader) -> tuple[dict, dict]:
    r.expect("clip_qkv", r.get("clip_qkv") is None, "no QKV clipping")
    r.expect("attention_bias", not r.get("attention_bias", False), "OLMoE attention has no bias in moetrain")
    ffn = int(r.need("intermediate_size"))
    return (
        dict(ffn_dim=ffn, qk_norm=True),
        dict(
            num_experts=int(r.need("num_experts")),
            top_k=int(r.need("num_experts_per_tok")),
            expert_ffn_dim=ffn,
            renormalize=bool(r.get("norm_topk_prob", False)),
        ),
    )


def _ernie(r: _Reader) -> tuple[dict, dict]:
    n_layers = int(r.need("num_hidden_layers"))
    r.expect("use_bias", not r.get("use_bias", False), "no bias on attention / FFN projections")
    r.expect(
        "moe_layer_interval", int(r.get("moe_layer_interval", 1)) == 1, "MoE every layer after the dense first ones"
    )
    r.expect(
        "moe_layer_end_index", int(r.get("moe_layer_end_index", -1)) in (-1, n_layers - 1), "MoE up to the last layer"
    )
    E, K = int(r.need("moe_num_experts")), int(r.need("moe_k"))
    # weights / clamp(sum, norm_min): the top-k softmax scores sum to >= K / E, so a smaller
    # norm_min never clamps and plain renormalisation is exact
    r.expect(
        "moe_norm_min", float(r.get("moe_norm_min", 1e-12)) < K / E, f"must be < moe_k / moe_num_experts = {K / E}"
    )
    return (
        dict(ffn_dim=int(r.need("intermediate_size"))),
        dict(
            num_experts=E,
            top_k=K,
            expert_ffn_dim=int(r.need("moe_intermediate_size")),
            renormalize=True,
            first_moe_layer=int(r.get("moe_layer_start_index", 1)),
            num_shared_experts=int(r.get("moe_num_shared_experts", 0)),
            expert_bias=True,
        ),
    )


_TO_MODEL = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe, "ernie4_5_moe": _ernie}


def check_special_ids(ids: dict[str, Any], vocab_size: int, where: str) -> None:
    """Every bos / eos / pad id (an int or a list of ints) in ``ids`` is in [0, vocab_size)."""
    for key in SPECIAL_IDS:
        value = ids.get(key)
        for ident in value if isinstance(value, list) else [value]:
            if ident is None:
                continue
            if isinstance(ident, bool) or not isinstance(ident, int) or not 0 <= ident < vocab_size:
                raise HFError(f"{where}: {key} {ident!r} is outside the vocabulary (vocab_size {vocab_size})")


def context_of(hf: dict[str, Any], base: ModelConfig | None, where: str = "config.json") -> tuple[int, str]:
    """(model.max_seq_len, where its cap comes from): an import takes max_position_embeddings
    (else :data:`DEFAULT_CONTEXT`); a fine-tune keeps ``base.max_seq_len``, refused above it."""
    limit = hf.get("max_position_embeddings")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise HFError(f"{where}: max_position_embeddings {limit!r} must be a positive integer")
    cap = (
        f"{where} max_position_embeddings {limit}"
        if limit is not None
        else f"{where} has no max_position_embeddings: {DEFAULT_CONTEXT} assumed"
    )
    if base is None:
        return limit or DEFAULT_CONTEXT, cap
    if limit is not None and base.max_seq_len > limit:
        raise HFError(
            f"model.max_seq_len ({base.max_seq_len}) exceeds max_position_embeddings ({limit}) of "
            f"{where}: the model has no positions past {limit}"
        )
    return base.max_seq_len, cap


def context_text(max_seq_len: int, cap: str) -> str:
    """One line stating a model's context and the cap that applies to it (plan, logs, import)."""
    return f"context: model.max_seq_len {max_seq_len} tokens (cap: {cap})"


def model_config_from_hf(
    hf: dict[str, Any], base: ModelConfig | None = None, *, where: str = "config.json"
) -> ModelConfig:
    """The moetrain model of an HF config. Fields HF does not fix (init_std, max_seq_len when
    ``base`` is given, capacity, balancing) come from ``base`` (default: ModelConfig())."""
    if not isinstance(hf, dict):
        raise HFError(f"{where}: not a JSON object")
    spec = arch_of(hf, where)
    r = _Reader(hf, where, context_of(hf, base, where)[0])
    model_kw, moe_kw = _TO_MODEL[spec.model_type](r)
    model_kw = {**_common(r), **model_kw}
    check_special_ids(hf, model_kw["vocab_size"], where)
    base = base or ModelConfig()
    first = moe_kw.get("first_moe_layer", 0)
    if first >= model_kw["n_layers"]:
        raise HFError(
            f"{where}: no MoE layer (the first MoE layer {first} >= num_hidden_layers {model_kw['n_layers']})"
        )
    moe = dataclasses.replace(
        base.moe,
        **{
            "every_n_layers": 1,
            "num_groups": 1,
            "first_moe_layer": 0,
            "num_shared_experts": 0,
            "shared_expert_ffn_dim": 0,
            "shared_expert_gate": False,
            "expert_bias": False,
            "router": "softmax_topk",
            **moe_kw,
        },
    )
    return dataclasses.replace(
        base, **{"qk_norm": False, "qkv_bias": False, **model_kw}, moe=moe, init_from=base.init_from
    )


# ---- ModelConfig -> HF config ----------------------------------------------------------------


def _cannot(arch: str, field: str, value: Any, why: str) -> HFError:
    return HFError(f"model.{field} ({value!r}) cannot be expressed as {arch}: {why}")


def _check_exportable(spec: ArchSpec, cfg: ModelConfig) -> None:
    moe, a = cfg.moe, spec.model_type
    if moe.every_n_layers != 1:
        raise _cannot(a, "moe.every_n_layers", moe.every_n_layers, "MoE must be every layer after the dense first ones")
    if moe.num_groups != 1:
        raise _cannot(a, "moe.num_groups", moe.num_groups, "no grouped routing")
    if cfg.qk_norm != (a == "olmoe"):
        raise _cannot(a, "qk_norm", cfg.qk_norm, "OLMoE has q/k norm, the others do not")
    if cfg.qkv_bias and a != "qwen2_moe":
        raise _cannot(a, "qkv_bias", cfg.qkv_bias, "only qwen2_moe has a QKV bias")
    if moe.expert_bias != (a == "ernie4_5_moe"):
        raise _cannot(a, "moe.expert_bias", moe.expert_bias, "only ernie4_5_moe has a selection bias")
    if a == "mixtral":
        if moe.router == "softmax_topk" and not moe.renormalize:
            raise _cannot(a, "moe.renormalize", False, "Mixtral renormalises the top-k weights")
        for f, v in (("num_shared_experts", moe.num_shared_experts), ("first_moe_layer", moe.first_moe_layer)):
            if v:
                raise _cannot(a, f"moe.{f}", v, "Mixtral has no shared experts or dense layers")
    elif moe.router == "topk_softmax" and not moe.renormalize:
        raise _cannot(a, "moe.router", moe.router, "set model.moe.renormalize=true (the same weights)")
    if a == "olmoe" and (moe.num_shared_experts or moe.first_moe_layer):
        raise _cannot(
            a, "moe.num_shared_experts", moe.num_shared_experts, "OLMoE has no shared experts or dense layers"
        )
    if a == "qwen2_moe" and moe.num_shared_experts not in (0, 1):
        raise _cannot(a, "moe.num_shared_experts", moe.num_shared_experts, "Qwen2-MoE has one shared expert")
    if a == "qwen2_moe" and moe.num_shared_experts and not moe.shared_expert_gate:
        raise _cannot(a, "moe.shared_expert_gate", False, "Qwen2-MoE's shared expert is gated")
    if a == "ernie4_5_moe" and (moe.shared_expert_gate or moe.shared_expert_ffn_dim not in (0, moe.expert_ffn_dim)):
        raise _cannot(
            a,
            "moe.shared_expert_ffn_dim",
            moe.shared_expert_ffn_dim,
            "Ernie's shared experts are ungated and of the expert width",
        )


def hf_config_from_model(
    spec: ArchSpec, cfg: ModelConfig, base: dict[str, Any] | None, *, dtype: str
) -> dict[str, Any]:
    """config.json for ``cfg`` as ``spec``: ``base`` (the imported config.json, if any) with
    every field moetrain models overwritten."""
    _check_exportable(spec, cfg)
    out = dict(base or {})
    rope = dict(out.get("rope_parameters") or {})
    rope.update(rope_theta=cfg.rope_theta, rope_type="default")
    out.update(
        architectures=[spec.architecture],
        model_type=spec.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        dtype=dtype,
    )
    out.setdefault("max_position_embeddings", cfg.max_seq_len)
    if "rope_theta" in out:
        out["rope_theta"] = cfg.rope_theta
    out.update(_arch_fields(spec, cfg))
    return out


def _arch_fields(spec: ArchSpec, cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields of ``spec``'s own names: FFN widths, experts, routing, dense layers."""
    moe, a = cfg.moe, spec.model_type
    if a == "mixtral":
        return dict(
            intermediate_size=moe.expert_ffn_dim, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k
        )
    if a == "qwen2_moe":
        return dict(
            intermediate_size=cfg.ffn_dim,
            moe_intermediate_size=moe.expert_ffn_dim,
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            norm_topk_prob=moe.renormalize,
            qkv_bias=cfg.qkv_bias,
            shared_expert_intermediate_size=moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim),
            decoder_sparse_step=1,
            mlp_only_layers=list(range(moe.first_moe_layer)),
        )
    if a == "olmoe":
        return dict(
            intermediate_size=moe.expert_ffn_dim,
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            norm_topk_prob=moe.renormalize,
        )
    return dict(  # ernie4_5_moe
        intermediate_size=cfg.ffn_dim,
        moe_intermediate_size=moe.expert_ffn_dim,
        moe_num_experts=moe.num_experts,
        moe_k=moe.top_k,
        moe_num_shared_experts=moe.num_shared_experts,
        moe_layer_start_index=moe.first_moe_layer,
        moe_layer_end_index=cfg.n_layers - 1,
        moe_layer_interval=1,
    )
