"""The memory planner (moetrain/plan.py): parameter counts of the shipped configs against the
published figures and against the built model, the activation model against the tensors autograd
really saves, the ZeRO / checkpointing terms by hand, and computed suggestions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moetrain.config import load_config
from moetrain.plan import (GIB, activation_bytes, count_params, plan_memory, suggestions, units_per_token,
                           vocab_size)

# Published totals / active parameters (model cards and papers), in units of 1e9. Tolerance 2%:
# the published figures are rounded to 0.1e9 (OLMoE's 1.3e9 active is 1.28e9 by its own config).
PUBLISHED = {
    "olmoe-1b-7b": (6.9, 1.3),
    "qwen15-moe-a2.7b": (14.3, 2.7),
    "mixtral-8x7b": (46.7, 12.9),
    "deepseek-moe-16b": (16.4, 2.8),
}
REL_TOL = 0.02
SHIPPED = ("olmoe-1b-7b", "qwen15-moe-a2.7b", "mixtral-8x7b", "deepseek-moe-16b", "olmoe-1b-7b-mini",
           "qwen15-moe-a2.7b-mini", "mixtral-8x7b-mini", "deepseek-moe-16b-mini", "olmoe-1b-7b-1b")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes_match_published_parameter_counts(name):
    pc = count_params(load_config(name))
    total, active = PUBLISHED[name]
    assert pc.total / 1e9 == pytest.approx(total, rel=REL_TOL)
    assert pc.active / 1e9 == pytest.approx(active, rel=REL_TOL)


def test_olmoe_count_by_hand():
    """16 x (attention 4 D^2 + q/k norms 2 D + 2 norms 2 D + router 64 D + 64 experts 3 D F)
    + untied embedding and head 2 V D + final norm D, with D 2048, F 1024, V 50304."""
    D, F, V = 2048, 1024, 50304
    per_layer = 4 * D * D + 2 * D + 2 * D + 64 * D + 64 * 3 * D * F
    assert count_params(load_config("olmoe-1b-7b")).total == 16 * per_layer + 2 * V * D + D


def test_largest_sibling_has_a_billion_parameters_and_the_planner_fits_it_in_20_gb():
    cfg = load_config("olmoe-1b-7b-1b")
    assert count_params(cfg).total >= 1e9
    plan = plan_memory(cfg, available_bytes=int(20e9 / cfg.cluster.num_workers), source="test")
    assert plan.fits, plan.total_bytes * cfg.cluster.num_workers / 1e9


# model.<path>: (value that adds parameters, value that does not, settings the probe needs)
FEATURES = {"n_kv_heads": (2, 0, []), "qk_norm": (True, False, []), "qkv_bias": (True, False, []),
            "moe.shared_expert_gate": (True, False, ["model.moe.num_shared_experts=1"])}


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("-mini")])
def test_counts_equal_the_built_model(name):
    """The planner's count equals the parameters of the model really built (one rank holds every
    expert); shape fields the model does not implement yet are switched off on both sides."""
    from moetrain.model import Transformer

    sets = ["model.vocab_size=4096"]
    for path, (on_value, off_value, probe) in FEATURES.items():
        if not _model_implements(path, on_value, probe):
            sets.append(f"model.{path}={off_value}")
    if load_config(name).model.moe.shared_expert_ffn_dim and not _model_implements(
            "moe.shared_expert_ffn_dim", 512, ["model.moe.num_shared_experts=1"]):
        sets.append("model.moe.shared_expert_ffn_dim=0")
    cfg = load_config(name, sets)
    model = Transformer(cfg.model, seed=0)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.experts == sum(p.numel() for _, p in model.expert_parameters())


def _model_implements(path: str, value, probe: list[str]) -> bool:
    """Whether building the model with ``model.<path>=value`` changes its parameter count (the
    behaviour of the #12 shape fields lands with another branch)."""
    from moetrain.model import Transformer

    base = load_config("tiny", ["model.vocab_size=300"] + probe).model
    on = load_config("tiny", ["model.vocab_size=300", f"model.{path}={value}"] + probe).model
    return sum(p.numel() for p in Transformer(on, seed=0).parameters()) != \
        sum(p.numel() for p in Transformer(base, seed=0).parameters())


def test_activation_model_matches_the_tensors_autograd_saves():
    """fp32, one rank, no checkpointing: the planner's activation bytes minus the logits the step
    holds (not saved by autograd) equal the distinct storages saved for backward (within 3%)."""
    from moetrain import losses
    from moetrain.model import Transformer

    cfg = load_config("olmoe-1b-7b-mini", ["model.vocab_size=512", "cluster.num_workers=1",
                                           "train.global_batch_size=4", "data.seq_len=64"])
    model = Transformer(cfg.model, seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    tokens = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, routing = model(tokens[:, :-1])
        loss = losses.lm_loss(logits, tokens[:, 1:]) + sum(losses.z_loss(r.logits_TE) for r in routing)
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    held_logits = 4 * 64 * vocab_size(cfg) * 4
    assert activation_bytes(cfg, "none") - held_logits == pytest.approx(measured, rel=0.03)
    assert loss.requires_grad


def test_state_terms_by_hand():
    """ZeRO-1: dense AdamW moments + fp32 partition copy over N; ZeRO-2 also dense gradients over N;
    experts: only the local slots, whole."""
    base = ["cluster.num_workers=4", "train.global_batch_size=16", "model.vocab_size=1000"]
    cfg0 = load_config("tiny", base)
    pc = count_params(cfg0)
    local = pc.experts // 4
    p0 = plan_memory(cfg0)
    assert p0.param_bytes == 4 * (pc.dense + local)
    assert p0.optimizer_bytes == 8 * (pc.dense + local)
    p1 = plan_memory(load_config("tiny", base + ["train.zero_stage=1"]))
    assert p1.optimizer_bytes == 12 * math.ceil(pc.dense / 4) + 8 * local
    assert p1.grad_bytes == p0.grad_bytes
    p2 = plan_memory(load_config("tiny", base + ["train.zero_stage=2"]))
    assert p2.grad_bytes == 4 * (pc.dense // 4 + local)


def test_runtime_counts_the_streamed_data_cache_by_hand():
    """Runtime = the measured base + the data cache: 4 B per token, a token >= 1 byte of text, at
    most the reader's LRU cap; a prepared corpus (any size) counts the whole cap."""
    from moetrain.data.stream import CACHE_BYTES
    from moetrain.plan import DATA_CACHE_BYTES, RUNTIME_BASE_BYTES

    assert DATA_CACHE_BYTES == CACHE_BYTES
    small = load_config("tiny", ["data.max_bytes_per_domain=1000000"])  # builtin: 2 domains
    assert plan_memory(small).runtime_bytes == RUNTIME_BASE_BYTES + 4 * 2 * 1_000_000
    big = load_config("tiny", ["data.max_bytes_per_domain=100000000"])
    assert plan_memory(big).runtime_bytes == RUNTIME_BASE_BYTES + CACHE_BYTES
    prepared = load_config("tiny", ["data.source=prepared", "data.prepared_uri=/nowhere", "data.max_bytes_per_domain=1000"])
    assert plan_memory(prepared).runtime_bytes == RUNTIME_BASE_BYTES + CACHE_BYTES


def test_checkpointing_and_bf16_shrink_activations():
    cfg = load_config("olmoe-1b-7b-mini")
    none, block, attn = (activation_bytes(cfg, m) for m in ("none", "block", "attention"))
    assert block < attn < none
    bf16 = load_config("olmoe-1b-7b-mini", ["train.precision=bf16"])
    assert activation_bytes(bf16, "none") < none


def test_units_per_token_by_hand():
    """E 4, R 2, K 2, dedup: a token misses a rank when both experts are on the other one,
    C(2,2)/C(4,2) = 1/6, so it reaches 2 x 5/6 ranks on average."""
    cfg = load_config("tiny", ["model.moe.num_experts=4", "model.moe.top_k=2", "cluster.num_workers=2"])
    assert units_per_token(cfg) == pytest.approx(2 * 5 / 6)
    no_dedup = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, moe=dataclasses.replace(cfg.model.moe, dedup=False)))
    assert units_per_token(no_dedup) == 2


def test_suggestions_are_computed_and_each_fits():
    cfg = load_config("olmoe-1b-7b")
    need = plan_memory(cfg).total_bytes
    available = int(need * 0.8)
    found = suggestions(cfg, available)
    assert found and any("cluster.num_workers=" in s for s in found)
    for s in found:  # apply each suggestion and re-plan: it fits
        sets = [part for part in s.split(" (")[0].split("--set ") if part.strip()]
        assert plan_memory(load_config("olmoe-1b-7b", [x.strip() for x in sets])).total_bytes <= available


def test_mixtral_cannot_fit_80_gib_and_more_actors_do_not_help():
    cfg = load_config("mixtral-8x7b")
    plan = plan_memory(cfg, available_bytes=80 * GIB, source="test")
    assert plan.fits is False and plan.suggestions[0].startswith("nothing fits")
    assert plan_memory(cfg, available_bytes=141 * GIB, source="test").fits
