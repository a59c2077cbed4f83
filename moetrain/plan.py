"""Memory planner: parameter counts and the per-rank memory of a run, from its config alone.

Owns: counting a model's parameters (total, active, dense, routed experts, per rank) and the
bytes one rank needs — parameters, gradients, optimizer state, saved activations of one
micro-batch (with and without activation checkpointing), all-to-all buffers — against the memory
available, and which single settings (or combination) would make a run fit. Pure arithmetic: no
torch, no Ray; ``docs/memory_planner.md`` derives every term and holds the validation table.
Size: over 500 lines because each term of that derivation stays next to the others it is summed
with, and the suggestion search at the end re-runs the same arithmetic.

Conventions (Hugging Face's modules, which the shipped shapes follow): q/k RMSNorm as in OLMoE
(q over D, k over the key/value width), qkv bias on q, k and v, one shared-expert block of width
``num_shared_experts x shared_expert_ffn_dim`` with a ``D -> 1`` sigmoid gate, routers without bias.
Legend: t tokens of one micro-batch on one rank, D width, F expert / shared / dense FFN width,
E experts, K top-k, R ranks, S local slots, V vocabulary, H heads, kvd key/value width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moetrain.config import RunConfig

GIB = 1024**3
FP32_BYTES = 4
BF16_BYTES = 2
INDEX_BYTES = 8  # int64 routing indices
MASTER_BYTES = 4  # fp32 weights (also under bf16: fp32 master weights)
GRAD_BYTES = 4  # fp32 gradients (autograd accumulates into the fp32 leaves)
ADAM_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32
ZERO_COPY_BYTES = 4  # DeepSpeed ZeRO-1/2 keeps an fp32 copy of its 1/N partition of the dense parameters
# Bytes a rank process holds before its model exists, measured on the 2-core CPU machines (torch
# 2.13, streamed data): resident set after importing torch, moetrain and ray (288 MiB + ray's
# worker 31 MiB), opening the prepared data (7-9 MiB), reading its first row groups (55-65 MiB:
# pyarrow's Parquet / zstd code and memory pool, first use) and one AdamW step (which imports
# ~72 MB more): 435-439 MiB without the Ray worker, for any corpus size.
RUNTIME_BASE_BYTES = 470 * 1024**2
# The streamed data keeps decoded row groups in an LRU cache (moetrain.data.stream.CACHE_BYTES):
# at most that, and at most the corpus itself as int32 tokens. For builtin / paths sources the
# corpus is bounded by its text cap (a token is at least one byte of text); a prepared corpus
# can be any size, so it counts the whole cache.
DATA_CACHE_BYTES = 256 << 20  # = moetrain.data.stream.CACHE_BYTES (plan.py imports no torch)
TOKEN_BYTES = 4  # int32 token ids
MAX_SUGGESTED_WORKERS = 1024  # the largest actor count a suggestion may propose


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model config (logical experts counted once)."""

    embedding: int  # token embedding, plus the LM head when untied
    attention: int  # q, k, v, o projections (+ qkv bias, q/k norms) of every block
    norms: int  # block and final RMSNorm weights
    dense_ffn: int  # SwiGLU FFNs of the dense blocks
    routers: int  # router gates
    shared: int  # shared experts and their gates
    experts: int  # every routed expert of every MoE layer
    expert_each: int  # one routed expert (gate, up, down)
    moe_layers: int
    top_k: int

    @property
    def total(self) -> int:
        return self.dense + self.experts

    @property
    def dense(self) -> int:
        return self.embedding + self.attention + self.norms + self.dense_ffn + self.routers + self.shared

    @property
    def active(self) -> int:
        """Parameters one token touches: the dense ones plus k routed experts per MoE layer."""
        return self.dense + self.moe_layers * self.top_k * self.expert_each


def is_moe_block(cfg: RunConfig, i: int) -> bool:
    moe = cfg.model.moe
    return i >= moe.first_moe_layer and (i - moe.first_moe_layer) % moe.every_n_layers == 0


def vocab_size(cfg: RunConfig) -> int:
    """model.vocab_size, or data.vocab_size (the tokenizer's target size, an upper bound) when 0."""
    return cfg.model.vocab_size or cfg.data.vocab_size


def kv_dim(cfg: RunConfig) -> int:
    m = cfg.model
    return (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)


def shared_width(cfg: RunConfig) -> int:
    moe = cfg.model.moe
    return moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)


def count_params(cfg: RunConfig) -> ParamCounts:
    """Parameter counts of ``cfg.model`` (see the module docstring for the conventions)."""
    m, moe = cfg.model, cfg.model.moe
    D, V, kvd = m.dim, vocab_size(cfg), kv_dim(cfg)
    n_moe = sum(is_moe_block(cfg, i) for i in range(m.n_layers))
    attn = 2 * D * D + 2 * D * kvd + (D + 2 * kvd) * m.qkv_bias + (D + kvd) * m.qk_norm
    sw = shared_width(cfg)
    return ParamCounts(
        embedding=V * D * (1 if m.tie_embeddings else 2),
        attention=m.n_layers * attn,
        norms=(2 * m.n_layers + 1) * D,
        dense_ffn=(m.n_layers - n_moe) * 3 * D * m.ffn_dim,
        routers=n_moe * moe.num_experts * D,
        shared=n_moe * (3 * D * sw + (D if moe.shared_expert_gate and sw else 0)),
        experts=n_moe * moe.num_experts * 3 * D * moe.expert_ffn_dim,
        expert_each=3 * D * moe.expert_ffn_dim,
        moe_layers=n_moe,
        top_k=moe.top_k,
    )


def slots_per_rank(cfg: RunConfig) -> int:
    return cfg.placement.slots_per_rank or -(-cfg.model.moe.num_experts // cfg.cluster.num_workers)


def tokens_per_micro_batch(cfg: RunConfig) -> int:
    """t: tokens one rank runs through the model per micro-batch."""
    return cfg.micro_batch_size * cfg.data.seq_len


def units_per_token(cfg: RunConfig) -> float:
    """Rows a token sends through the all-to-all: K without dedup; with dedup the expected number
    of distinct ranks among its K experts under uniform routing, R (1 - C(E - E/R, K) / C(E, K))."""
    moe, R = cfg.model.moe, cfg.cluster.num_workers
    if R == 1 or not moe.dedup:
        return float(moe.top_k if R > 1 else 0)
    E, K, per_rank = moe.num_experts, moe.top_k, moe.num_experts / R
    miss = math.comb(E - int(per_rank), K) / math.comb(E, K) if E - per_rank >= K else 0.0
    return R * (1.0 - miss)


@dataclass(frozen=True)
class BlockActivations:
    """Bytes one block saves for backward (one micro-batch on one rank)."""

    attention: int  # qkv, rotated q/k, attention output, logsumexp, projections' inputs
    rest: int  # norm inputs, FFN / router / experts / shared expert intermediates
    a2a_saved: int  # all-to-all outputs kept by checkpointing (so a recompute re-runs no collective)
    block_input: int  # the residual stream entering the block

    @property
    def full(self) -> int:
        return self.attention + self.rest


def _act_bytes(cfg: RunConfig) -> int:
    return BF16_BYTES if cfg.train.precision == "bf16" else FP32_BYTES


def block_activations(cfg: RunConfig, moe_block: bool) -> BlockActivations:
    """Saved-for-backward bytes of one block; docs/memory_planner.md lists each tensor."""
    m, moe = cfg.model, cfg.model.moe
    t, D, kvd, a = tokens_per_micro_batch(cfg), m.dim, kv_dim(cfg), _act_bytes(cfg)
    # x_norm (the QKV input), qkv (kept whole by the v view), rotated q and k, SDPA output, the
    # reshaped output (wo's input); logsumexp per head in fp32.
    attention = t * (a * (D + (D + 2 * kvd) + D + kvd + D + D) + FP32_BYTES * m.n_heads)
    # q/k norm (OLMoE): its input is a view of qkv (counted above); it adds the fp32 normalised
    # q and k and one rstd each
    attention += t * FP32_BYTES * (D + kvd + 2) * m.qk_norm
    # each RMSNorm keeps its fp32 input, rstd and normalised input (the weight's gradient needs it)
    norms = t * 2 * (2 * D + 1) * FP32_BYTES
    if not moe_block:
        rest = norms + t * a * (D + 4 * m.ffn_dim)  # normed input, gate, silu, up, product
        return BlockActivations(attention, rest, 0, t * D * FP32_BYTES)
    rows = t * moe.top_k  # (token, expert) rows this rank's experts receive, balanced routing
    # normed input; softmax scores and the logits the z-loss keeps (fp32); top-k ids, pair indices
    router = t * (a * D + 2 * moe.num_experts * FP32_BYTES + 4 * moe.top_k * INDEX_BYTES)
    # per row: its input, gate, silu, up, product, output, weighted output; its weight
    experts = rows * (a * (3 * D + 4 * moe.expert_ffn_dim) + FP32_BYTES)
    sw = shared_width(cfg)
    shared = t * a * (4 * sw + (2 if moe.shared_expert_gate and sw else 0))
    units = t * units_per_token(cfg)
    ep = 0
    if cfg.cluster.num_workers > 1:  # the returned rows (kept by the final index_add) and unit indices
        ep = int(units * (a * D + INDEX_BYTES) + rows * INDEX_BYTES)
    a2a_saved = int(units * a * (2 * D + moe.top_k)) if cfg.cluster.num_workers > 1 else 0
    return BlockActivations(attention, norms + router + int(experts) + shared + ep, a2a_saved, t * D * FP32_BYTES)


def head_activations(cfg: RunConfig) -> int:
    """Final norm (input, normalised input, output), the fp32 logits the step keeps and
    log-softmax's output."""
    t, D, V = tokens_per_micro_batch(cfg), cfg.model.dim, vocab_size(cfg)
    return t * (3 * D * FP32_BYTES + 2 * V * FP32_BYTES)


def activation_bytes(cfg: RunConfig, mode: str) -> int:
    """Peak saved activations of one micro-batch under checkpointing ``mode`` (none | block |
    attention): what is kept for every block, plus one block's recomputed internals."""
    blocks = [block_activations(cfg, is_moe_block(cfg, i)) for i in range(cfg.model.n_layers)]
    head = head_activations(cfg)
    if mode == "none":
        return head + sum(b.full for b in blocks)
    if mode == "block":
        return head + sum(b.block_input + b.a2a_saved for b in blocks) + max(b.full for b in blocks)
    if mode == "attention":
        kept = sum(b.rest + t_in for b, t_in in zip(blocks, (b.block_input for b in blocks)))
        return head + kept + max(b.attention for b in blocks)
    raise ValueError(f"train.activation_checkpointing ({mode!r}) must be none, block or attention")


def a2a_buffer_bytes(cfg: RunConfig) -> int:
    """Transient all-to-all buffers of one MoE layer: the payload sent and received (rows + K
    weights) and the returned rows, in the activation dtype (0 on one rank)."""
    if cfg.cluster.num_workers == 1:
        return 0
    units = tokens_per_micro_batch(cfg) * units_per_token(cfg)
    D, K, a = cfg.model.dim, cfg.model.moe.top_k, _act_bytes(cfg)
    return int(units * a * (2 * (D + K) + 2 * D))


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak bytes of one rank (the most loaded: the most local expert slots)."""

    params: ParamCounts
    params_per_rank: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # under the configured train.activation_checkpointing
    activations_by_mode: dict  # none / block / attention -> bytes
    a2a_bytes: int
    workspace_bytes: int  # of the peak phase: bf16 weight copies, or the flat gradient buffer + an AdamW temporary
    peak_phase: str  # "backward" or "optimizer step": where the rank's peak falls
    phase_bytes: int  # what the peak phase holds beyond parameters and optimizer state
    runtime_bytes: int  # the process before its model: Python, torch, Ray worker, data
    available_bytes: int | None  # per rank; None = unknown
    available_source: str
    suggestions: tuple[str, ...] = ()

    @property
    def model_bytes(self) -> int:
        """Everything the training step adds above the process's runtime baseline: parameters,
        optimizer state and the peak phase (gradients and activations are not all live at once)."""
        return self.param_bytes + self.optimizer_bytes + self.phase_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.available_bytes is None else self.total_bytes <= self.available_bytes

    @property
    def shortfall_bytes(self) -> int:
        return 0 if self.available_bytes is None else max(0, self.total_bytes - self.available_bytes)

    def to_dict(self) -> dict:
        return {
            "params_total": self.params.total,
            "params_active": self.params.active,
            "params_per_rank": self.params_per_rank,
            "param_bytes": self.param_bytes,
            "grad_bytes": self.grad_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "activation_bytes": self.activation_bytes,
            "activations_by_mode": dict(self.activations_by_mode),
            "a2a_bytes": self.a2a_bytes,
            "workspace_bytes": self.workspace_bytes,
            "peak_phase": self.peak_phase,
            "phase_bytes": self.phase_bytes,
            "model_bytes": self.model_bytes,
            "runtime_bytes": self.runtime_bytes,
            "total_bytes": self.total_bytes,
            "available_bytes": self.available_bytes,
            "available_source": self.available_source,
            "fits": self.fits,
            "suggestions": list(self.suggestions),
        }


@dataclass(frozen=True)
class _State:
    """Per-rank parameter counts and the bytes of the persistent training state."""

    dense: int  # dense parameters (every rank holds all of them)
    experts_local: int  # routed-expert parameters in this rank's slots
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int


def _state(cfg: RunConfig, pc: ParamCounts) -> _State:
    R, stage = cfg.cluster.num_workers, cfg.train.zero_stage
    local = pc.moe_layers * slots_per_rank(cfg) * pc.expert_each
    dense_grads = pc.dense // R if stage >= 2 else pc.dense
    dense_opt = -(-pc.dense // R) * (ADAM_BYTES + ZERO_COPY_BYTES) if stage >= 1 else pc.dense * ADAM_BYTES
    return _State(
        pc.dense,
        local,
        MASTER_BYTES * (pc.dense + local),
        GRAD_BYTES * (dense_grads + local),
        dense_opt + ADAM_BYTES * local,
    )


def _block_param_bytes(cfg: RunConfig, pc: ParamCounts, st: _State) -> list[int]:
    """Gradient bytes each block's backward allocates on this rank (experts: the local slots)."""
    n, per_block_attn = cfg.model.n_layers, pc.attention // cfg.model.n_layers + 2 * cfg.model.dim
    dense_div = cfg.cluster.num_workers if cfg.train.zero_stage >= 2 else 1
    out = []
    for i in range(n):
        if is_moe_block(cfg, i):
            moe_dense = (pc.routers + pc.shared) // max(pc.moe_layers, 1)
            out.append(GRAD_BYTES * ((per_block_attn + moe_dense) // dense_div + st.experts_local // pc.moe_layers))
        else:
            out.append(GRAD_BYTES * (per_block_attn + 3 * cfg.model.dim * cfg.model.ffn_dim) // dense_div)
    return out


def _backward_peak(cfg: RunConfig, pc: ParamCounts, st: _State, mode: str) -> int:
    """Largest (live activations + gradients) during forward / backward of the last micro-batch:
    at the start of backward every block's activations live; each block's backward then allocates
    its gradients before freeing its activations. With accumulation the gradients of earlier
    micro-batches are all live throughout."""
    blocks = [block_activations(cfg, is_moe_block(cfg, i)) for i in range(cfg.model.n_layers)]
    kept = {
        "none": [b.full for b in blocks],
        "block": [b.block_input + b.a2a_saved for b in blocks],
        "attention": [b.rest + b.block_input for b in blocks],
    }[mode]
    recompute = {"none": 0, "block": max(b.full for b in blocks), "attention": max(b.attention for b in blocks)}[mode]
    t, V, D = tokens_per_micro_batch(cfg), vocab_size(cfg), cfg.model.dim
    if cfg.train.grad_accum_steps > 1:
        return st.grad_bytes + activation_bytes(cfg, mode) + 2 * t * V * FP32_BYTES
    live = head_activations(cfg) + sum(kept) + 2 * t * V * FP32_BYTES + GRAD_BYTES * V * D  # d logits, d head
    peak = live
    for act, grad in zip(reversed(kept), reversed(_block_param_bytes(cfg, pc, st))):
        peak = max(peak, live + recompute + grad)
        live += grad - act
    return max(peak, st.grad_bytes)


def _workspace(cfg: RunConfig, pc: ParamCounts, st: _State) -> tuple[int, int]:
    """(forward/backward workspace, optimizer-step workspace) in bytes. bf16: weight copies (dense
    leaves cached by autocast for the forward; expert slices cast per use and saved unless the
    block is recomputed). Step: the flat dense-gradient buffer of the all-reduce (R > 1) and one
    AdamW temporary the size of the largest local tensor."""
    fwd = 0
    if cfg.train.precision == "bf16":
        experts = (
            st.experts_local
            if cfg.train.activation_checkpointing != "block"
            else st.experts_local // max(pc.moe_layers, 1)
        )
        fwd = BF16_BYTES * (st.dense + experts)
    flat = GRAD_BYTES * st.dense if cfg.cluster.num_workers > 1 else 0
    largest = max(
        vocab_size(cfg) * cfg.model.dim,
        slots_per_rank(cfg) * pc.expert_each // 3,
        3 * cfg.model.dim * cfg.model.ffn_dim // 3,
    )
    return fwd, flat + FP32_BYTES * largest


def runtime_bytes(cfg: RunConfig) -> int:
    """A rank process's resident bytes before its model exists (see RUNTIME_BASE_BYTES)."""
    return RUNTIME_BASE_BYTES + data_cache_bytes(cfg)


def data_cache_bytes(cfg: RunConfig) -> int:
    """The most decoded token rows a rank's streamed data may cache (see DATA_CACHE_BYTES)."""
    if cfg.data.source == "prepared":
        return DATA_CACHE_BYTES
    domains = 2 if cfg.data.source == "builtin" else max(1, len(cfg.data.paths))
    return min(DATA_CACHE_BYTES, TOKEN_BYTES * domains * cfg.data.max_bytes_per_domain)


def plan_memory(
    cfg: RunConfig, *, available_bytes: int | None = None, source: str = "unknown", suggest: bool = True
) -> MemoryPlan:
    """Predicted peak memory of one rank of ``cfg``: parameters + optimizer state + the larger of
    the forward/backward phase (live activations and gradients, all-to-all buffers, bf16 weight
    copies) and the optimizer-step phase (gradients, the flat gradient buffer, one AdamW temporary).
    ``available_bytes`` is per rank. ``suggest``: list the settings that would make it fit."""
    pc = count_params(cfg)
    st = _state(cfg, pc)
    mode = cfg.train.activation_checkpointing
    fwd_ws, step_ws = _workspace(cfg, pc, st)
    a2a = a2a_buffer_bytes(cfg)
    fwd_bwd = _backward_peak(cfg, pc, st, mode) + a2a + fwd_ws
    step = st.grad_bytes + step_ws
    acts = {m: activation_bytes(cfg, m) for m in ("none", "block", "attention")}
    peak_phase, phase, workspace = max(
        ("backward", fwd_bwd, fwd_ws), ("optimizer step", step, step_ws), key=lambda p: p[1]
    )
    plan = MemoryPlan(
        params=pc,
        params_per_rank=st.dense + st.experts_local,
        param_bytes=st.param_bytes,
        grad_bytes=st.grad_bytes,
        optimizer_bytes=st.optimizer_bytes,
        activation_bytes=acts[mode],
        activations_by_mode=acts,
        a2a_bytes=a2a,
        workspace_bytes=workspace,
        peak_phase=peak_phase,
        phase_bytes=phase,
        runtime_bytes=runtime_bytes(cfg),
        available_bytes=available_bytes,
        available_source=source,
    )
    if suggest and plan.fits is False:
        plan = dataclasses.replace(plan, suggestions=suggestions(cfg, available_bytes))
    return plan


# --------------------------------------------------------------------------------------------
# What would make it fit
# --------------------------------------------------------------------------------------------


def _variant(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig | None:
    """``cfg`` with ``overrides`` (dotted paths), or None when that combination is invalid."""
    from moetrain.config import ConfigError, apply_overrides, from_dict

    try:
        return from_dict(apply_overrides(cfg.to_dict(), [f"{k}={v}" for k, v in overrides.items()]))
    except ConfigError:
        return None


def _knobs(cfg: RunConfig) -> list[list[dict[str, object]]]:
    """Per setting, the candidate changes from the mildest to the strongest."""
    t, c, E = cfg.train, cfg.cluster, cfg.model.moe.num_experts
    zero: list[dict[str, object]] = [{"train.zero_stage": s} for s in (1, 2) if s > t.zero_stage]
    ckpt: list[dict[str, object]] = [
        {"train.activation_checkpointing": m}
        for m in ("attention", "block")
        if t.activation_checkpointing == "none" or (m == "block" and t.activation_checkpointing == "attention")
    ]
    micro: list[dict[str, object]] = []
    accum = t.grad_accum_steps
    while cfg.micro_batch_size > 1 and accum < t.global_batch_size:
        accum += 1
        if t.global_batch_size % (accum * c.num_workers) == 0:
            micro.append({"train.grad_accum_steps": accum})
    actors, r = [], c.num_workers
    while r < min(MAX_SUGGESTED_WORKERS, 2 * max(E, c.num_workers)):  # past E actors only ZeRO shards shrink
        r *= 2
        change: dict[str, object] = {"cluster.num_workers": r}
        if E % r:
            change["placement.slots_per_rank"] = -(-E // r)
        fits_accum = [a for a in range(t.grad_accum_steps, 0, -1) if t.global_batch_size % (a * r) == 0]
        if fits_accum and fits_accum[0] != t.grad_accum_steps:
            change["train.grad_accum_steps"] = fits_accum[0]  # same global batch, fewer micro-batches
        elif not fits_accum:
            per = t.grad_accum_steps * r
            change["train.global_batch_size"] = per * -(-t.global_batch_size // per)
        actors.append(change)
    return [zero, ckpt, micro, actors]


def _need(cfg: RunConfig) -> int:
    return plan_memory(cfg, suggest=False).total_bytes


def _describe(change: dict[str, object], need: int) -> str:
    sets = " ".join(f"--set {k}={v}" for k, v in change.items())
    return f"{sets} ({need / GIB:.1f} GiB per rank)"


def suggestions(cfg: RunConfig, available_bytes: int | None) -> tuple[str, ...]:
    """The mildest change of each setting (a ZeRO stage, checkpointing, a smaller micro-batch, more
    actors) that makes ``cfg`` fit in ``available_bytes`` per rank; when no single one does, the
    first combination (strongest ZeRO, checkpointing and micro-batch, then more actors) that does,
    else the smallest need found. Every figure is re-planned, nothing is canned."""
    if available_bytes is None:
        return ()
    out, strongest = [], {}
    for options in _knobs(cfg):
        for change in options:
            v = _variant(cfg, change)
            if v is not None and _need(v) <= available_bytes:
                out.append(_describe(change, _need(v)))
                break
        if options and options[-1].keys().isdisjoint({"cluster.num_workers"}):
            strongest.update(options[-1])
    if out:
        return tuple(out)
    best: tuple[int, dict] | None = None
    for change in [{}] + _knobs(cfg)[3]:
        combo: dict[str, Any] = {**strongest, **change}
        r = int(combo.get("cluster.num_workers", cfg.cluster.num_workers))
        gb = int(combo.get("train.global_batch_size", cfg.train.global_batch_size))
        if "train.grad_accum_steps" in strongest and gb % r == 0:
            combo["train.grad_accum_steps"] = gb // r  # keep the smallest micro-batch: 1 sequence
        v = _variant(cfg, combo)
        if v is None:
            continue
        need = _need(v)
        if need <= available_bytes:
            return (_describe(combo, need),)
        if best is None or need < best[0]:
            best = (need, combo)
    if best is None:
        return ("no setting of zero_stage, activation_checkpointing, grad_accum_steps or num_workers is valid",)
    return (
        f"nothing fits: the least found is {best[0] / GIB:.1f} GiB per rank with "
        + " ".join(f"--set {k}={v}" for k, v in best[1].items()),
    )


# --------------------------------------------------------------------------------------------
# Memory available and the report
# --------------------------------------------------------------------------------------------


def local_memory_bytes() -> int:
    """This machine's physical memory (MemTotal)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: int | float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: MemoryPlan, cfg: RunConfig) -> str:
    """The ``moetrain plan`` report: parameter counts, then per-rank bytes, fit and suggestions."""
    pc, t, c = plan.params, cfg.train, cfg.cluster
    acts = plan.activations_by_mode
    lines = [
        f"parameters      {pc.total / 1e9:.3f}e9 total, {pc.active / 1e9:.3f}e9 active, {pc.dense / 1e9:.3f}e9 dense, "
        f"{pc.experts / 1e9:.3f}e9 in routed experts; {plan.params_per_rank / 1e9:.3f}e9 on the fullest rank",
        f"per rank        {c.num_workers} actor(s), {slots_per_rank(cfg)} expert slot(s) per layer, "
        f"micro-batch {cfg.micro_batch_size} x {cfg.data.seq_len} tokens, precision {t.precision}, "
        f"ZeRO {t.zero_stage}, checkpointing {t.activation_checkpointing}",
        f"  parameters    {_gib(plan.param_bytes)}   (fp32 master weights)",
        f"  gradients     {_gib(plan.grad_bytes)}",
        f"  optimizer     {_gib(plan.optimizer_bytes)}   (AdamW moments; dense / {c.num_workers} with ZeRO >= 1)",
        f"  activations   {_gib(plan.activation_bytes)}   per micro-batch (none {acts['none'] / GIB:.2f}, "
        f"block {acts['block'] / GIB:.2f}, attention {acts['attention'] / GIB:.2f} GiB)",
        f"  all-to-all    {_gib(plan.a2a_bytes)}   (one layer's send / receive buffers)",
        f"  workspace     {_gib(plan.workspace_bytes)}   (of the peak phase: {plan.peak_phase})",
        f"  runtime       {_gib(plan.runtime_bytes)}   (Python, torch, Ray worker, data)",
        f"  peak          {_gib(plan.total_bytes)}   = parameters + optimizer + {plan.peak_phase} phase "
        f"{plan.phase_bytes / GIB:.2f} GiB + runtime",
    ]
    if plan.available_bytes is None:
        lines.append("available       unknown (pass --memory-gb)")
    else:
        verdict = "fits" if plan.fits else f"does NOT fit: short by {plan.shortfall_bytes / GIB:.2f} GiB"
        lines.append(
            f"available       {plan.available_bytes / GIB:.2f} GiB per rank ({plan.available_source}): {verdict}"
        )
    lines += [f"would fit with  {s}" for s in plan.suggestions]
    return "\n".join(lines)


def refusal(plan: MemoryPlan) -> str:
    """One line for a run the planner says cannot fit: the shortfall and the first suggestion."""
    assert plan.available_bytes is not None  # a refusal needs a known budget
    hint = plan.suggestions[0] if plan.suggestions else "no suggestion"
    hint = hint if hint.startswith(("nothing", "no ")) else f"try {hint}"
    return (
        f"memory plan: a rank needs {plan.total_bytes / GIB:.2f} GiB but {plan.available_bytes / GIB:.2f} GiB "
        f"is available ({plan.available_source}), short by {plan.shortfall_bytes / GIB:.2f} GiB; "
        f"{hint} (see `moetrain plan`)"
    )
