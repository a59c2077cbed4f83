"""Tiny random Hugging Face MoE models, one per supported architecture, built from config
objects and saved with ``save_pretrained`` (nothing is downloaded), plus a small tokenizer.

transformers is imported inside the helpers: gloo test ranks import this module and do not
need it. Every parameter is redrawn (norm weights around 1, the rest N(0, 0.1^2)) so that a misplaced
norm, bias or gate changes the logits; Ernie's selection bias gets random values too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 300
ARCHS = ("mixtral", "qwen2_moe", "olmoe", "ernie4_5_moe")
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=VOCAB - 1,
              pad_token_id=None)


def hf_config(arch: str):
    import transformers

    if arch == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                           norm_topk_prob=False, mlp_only_layers=[0])
    if arch == "olmoe":
        return transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                        norm_topk_prob=True)
    return transformers.Ernie4_5_MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8,
                                           moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1)


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 1, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "def f(x): return x + 1\n" * 20],
                            trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}))


def save_random(arch: str, out: Path, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                max_shard_size: str = "", **overrides) -> Path:
    """A random model of ``arch`` saved in ``dtype`` (one file, or shards of ``max_shard_size``)."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=gen) * 0.05)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_models")
    return {arch: save_random(arch, root / arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def imported(hf_models, tmp_path_factory) -> dict[str, str]:
    from moetrain.hf import import_hf

    root = tmp_path_factory.mktemp("imported")
    return {arch: import_hf(str(d), str(root), run=arch.replace("_", "-")).uri for arch, d in hf_models.items()}


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
