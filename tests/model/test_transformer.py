"""Tests for moetrain.model.transformer (the whole single-rank model)."""

import numpy as np
import pytest
import torch

from moetrain.config import ConfigError, DataConfig, ModelConfig, MoEConfig, RunConfig, validate
from moetrain.losses import lm_loss
from moetrain.model import GroupedExperts, Transformer
from placement.placement import Placement


def tiny_cfg(**kw):
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16, **kw.pop("moe", {})})
    return ModelConfig(**{"vocab_size": 50, "dim": 32, "n_layers": 2, "n_heads": 4, "ffn_dim": 48,
                          "max_seq_len": 16, "moe": moe, **kw})


def test_shapes_and_one_route_per_moe_layer():
    model = Transformer(tiny_cfg(n_layers=4, moe={"first_moe_layer": 1, "every_n_layers": 2}), seed=0)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLU", "MoELayer", "SwiGLU", "MoELayer"]
    assert model.num_moe_layers == 2
    assert [m.layer_index for m in model.moe_layers()] == [0, 1]
    logits, routing = model(torch.randint(0, 50, (3, 10)))
    assert logits.shape == (3, 10, 50) and logits.dtype == torch.float32
    assert len(routing) == 2
    assert all(r.scores_TE.shape == (30, 4) and r.topk_ids_TK.shape == (30, 2) for r in routing)


def test_causal():
    model = Transformer(tiny_cfg(), seed=0)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    a, _ = model(tokens)
    b, _ = model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_a_few_adamw_steps_drive_the_loss_down():
    model = Transformer(tiny_cfg(), seed=1)
    tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits, _ = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None for _, p in model.dense_parameters())


def test_dense_and_expert_parameters_partition_all_parameters():
    model = Transformer(tiny_cfg(tie_embeddings=False, moe={"num_shared_experts": 1}), seed=0)
    dense, expert = dict(model.dense_parameters()), dict(model.expert_parameters())
    everything = dict(model.named_parameters())
    assert dense.keys().isdisjoint(expert.keys())
    assert dense.keys() | expert.keys() == everything.keys()
    grouped = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    assert {id(p) for p in expert.values()} == grouped
    assert any(".shared." in n for n in dense) and any(".router." in n for n in dense)
    assert "lm_head_VD" in dense
    tied = Transformer(tiny_cfg(), seed=0)
    assert "lm_head_VD" not in dict(tied.named_parameters())


def test_init_deterministic_in_seed():
    a, b, c = (Transformer(tiny_cfg(), seed=s) for s in (3, 3, 4))
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
        if "weight_D" not in na:
            assert not torch.equal(pa, pc), na


def test_dense_init_statistics():
    model = Transformer(tiny_cfg(n_layers=8, vocab_size=2000, dim=64), seed=0)
    params = dict(model.dense_parameters())
    assert abs(params["tok_embed_VD"].std().item() - 0.02) < 0.002
    assert abs(params["blocks.0.attn.wo_DD"].std().item() - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8)
    assert torch.equal(params["final_norm.weight_D"], torch.ones(64))


def test_vocab_size_must_be_set():
    with pytest.raises(ConfigError, match=r"model\.vocab_size \(0\)"):
        Transformer(tiny_cfg(vocab_size=0), seed=0)


@pytest.mark.parametrize("kw, field", [
    (dict(dim=30, n_heads=4), "model.dim"),
    (dict(moe={"top_k": 5}), "model.moe.top_k"),
    (dict(moe={"every_n_layers": 0}), "model.moe.every_n_layers"),
])
def test_bad_model_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Transformer(tiny_cfg(**kw), seed=0)


@pytest.mark.parametrize("kw, message", [
    (dict(dim=30, n_heads=4), "model.dim (30) must be divisible by model.n_heads (4)"),
    (dict(dim=36, n_heads=4), "model.dim / model.n_heads (9) must be even for rotary positions"),
    (dict(n_kv_heads=3), "model.n_kv_heads (3) must divide model.n_heads (4)"),
    (dict(norm_eps=0.0), "model.norm_eps (0.0) must be in (0, 1)"),
    (dict(moe={"top_k": 5}), "model.moe.top_k (5) must be <= model.moe.num_experts (4)"),
    (dict(moe={"top_k": 0}), "model.moe.top_k (0) must be in [1, inf)"),
    (dict(moe={"every_n_layers": 0}), "model.moe.every_n_layers (0) must be in [1, inf)"),
    (dict(moe={"first_moe_layer": 2}), "model.moe.first_moe_layer (2) must be < model.n_layers (2): no MoE layer"),
    (dict(moe={"num_groups": 3}), "model.moe.num_groups (3) must divide model.moe.num_experts (4)"),
    (dict(moe={"capacity_factor": -1.0}), "model.moe.capacity_factor (-1.0) must be in [0, inf)"),
    (dict(moe={"dispatch": "hierarchical", "a2a_chunks": 2}),
     "model.moe.a2a_chunks (2) must be 1 with model.moe.dispatch=hierarchical"),
])
def test_the_model_and_the_run_config_refuse_with_one_message(kw, message):
    """One validation: building the model and validating a run say the same line."""
    with pytest.raises(ConfigError) as built:
        Transformer(tiny_cfg(**kw), seed=0)
    assert str(built.value) == message
    cfg = tiny_cfg(**kw)
    cfg.vocab_size = 300
    with pytest.raises(ConfigError) as validated:
        validate(RunConfig(model=cfg, data=DataConfig(seq_len=16)))
    assert str(validated.value) == message


def test_placement_must_fit_the_model():
    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match="MoE layers"):
        Transformer(cfg, seed=0, placement=Placement.contiguous(3, 4, 2))
    with pytest.raises(ConfigError, match="model.moe.num_experts"):
        Transformer(cfg, seed=0, placement=Placement.contiguous(2, 8, 2))
    with pytest.raises(ConfigError, match="rank"):
        Transformer(cfg, seed=0, placement=Placement.contiguous(2, 4, 2), rank=2)


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = Transformer(tiny_cfg(), seed=0)
    with pytest.raises(ValueError, match="model.max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_replicated_placement_single_rank_gives_same_output():
    cfg = tiny_cfg()
    base = Transformer(cfg, seed=5)
    replicated = Transformer(cfg, seed=5, placement=Placement(np.array([[3, 1, 0, 2, 1]] * 2), (5,), 4))
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(base(tokens)[0], replicated(tokens)[0], atol=1e-5)
