"""Bad Hugging Face input: one line naming the problem, exit status 2 (``moetrain hf ...``,
``moetrain generate``), and the config mapping's refusals and accepted variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.helpers import update_json


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from cluster.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture()
def olmoe_dir(hf_models, tmp_path) -> Path:
    d = tmp_path / "olmoe"
    shutil.copytree(hf_models["olmoe"], d)
    return d


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("moetrain: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unsupported_architecture_names_it_and_the_supported_ones(olmoe_dir, tmp_path, capsys):
    update_json(olmoe_dir / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    rc, err = run_cli(["hf", "import", str(olmoe_dir), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "'llama'", "LlamaForCausalLM", "mixtral", "qwen2_moe", "olmoe", "ernie4_5_moe")


def test_a_field_moetrain_cannot_express_is_named(hf_models, tmp_path, capsys):
    d = tmp_path / "mixtral"
    shutil.copytree(hf_models["mixtral"], d)
    update_json(d / "config.json", sliding_window=8)
    rc, err = run_cli(["hf", "import", str(d), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "sliding_window=8")


def test_shape_mismatch_names_the_tensor(olmoe_dir, tmp_path, capsys):
    update_json(olmoe_dir / "config.json", intermediate_size=12)
    rc, err = run_cli(["hf", "import", str(olmoe_dir), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "model.layers.0.mlp.experts.0.gate_proj.weight", "[16, 32]", "[12, 32]")


@pytest.fixture()
def sharded(imported, tmp_path) -> Path:
    from moetrain.hf import export_hf

    out = tmp_path / "sharded"
    export_hf(imported["olmoe"], str(out), max_shard_bytes=40_000)
    return out


def test_missing_shard_names_it_and_a_tensor_it_holds(sharded, tmp_path, capsys):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.norm.weight"]
    (sharded / victim).unlink()
    rc, err = run_cli(["hf", "import", str(sharded), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, victim, "shard missing")


def test_extra_shard_is_refused(sharded, tmp_path, capsys):
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    shutil.copy(first, sharded / "model-00009-of-00009.safetensors")
    rc, err = run_cli(["hf", "import", str(sharded), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "model-00009-of-00009.safetensors", "extra shard")


def test_missing_and_extra_tensors_are_named(hf_models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "qwen"
    shutil.copytree(hf_models["qwen2_moe"], d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.2.mlp.shared_expert_gate.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    rc, err = run_cli(["hf", "import", str(d), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "model.layers.2.mlp.shared_expert_gate.weight", "missing")
    tensors["model.layers.2.mlp.shared_expert_gate.weight"] = tensors["model.norm.weight"][None].clone()
    tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.1.mlp.gate.weight"].clone()  # layer 0 is dense
    save_file(tensors, str(d / "model.safetensors"))
    rc, err = run_cli(["hf", "import", str(d), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "unexpected tensor model.layers.0.mlp.gate.weight")


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(imported, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    big = tmp_path / "big"
    big.mkdir()
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(big / "tokenizer.json"))
    rc, err = run_cli(["generate", imported["olmoe"], "--prompt", "w1 w2", "--tokenizer", str(big)], capsys)
    assert_one_line(rc, err, "tokenizer vocabulary (400)", "model.vocab_size (300)")


def test_training_with_a_tokenizer_larger_than_the_model_is_refused(hf_models, tmp_path):
    from moetrain.config import ConfigError, from_dict
    from moetrain.hf import resolve_init_from
    from moetrain.train.trainer import check_vocab

    cfg = resolve_init_from(from_dict({"model": {"init_from": f"hf:{hf_models['mixtral']}", "max_seq_len": 32},
                                       "data": {"seq_len": 16}}))
    check_vocab(cfg, 300)
    with pytest.raises(ConfigError, match=r"tokenizer vocabulary \(301.*model.vocab_size \(300\)"):
        check_vocab(cfg, 301)


# ---- config mapping ----------------------------------------------------------------------------


def qwen(**kw) -> dict:
    base = {"model_type": "qwen2_moe", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 48, "moe_intermediate_size": 16,
            "num_experts": 8, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 24,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "rms_norm_eps": 1e-6}
    return {**base, **kw}


def test_qwen2_moe_mapping_dense_first_layers_shared_gate_and_bias():
    from moetrain.hf import model_config_from_hf

    m = model_config_from_hf(qwen(mlp_only_layers=[0, 1], norm_topk_prob=True))
    assert (m.moe.first_moe_layer, m.moe.num_shared_experts, m.moe.shared_expert_ffn_dim) == (2, 1, 24)
    assert m.moe.shared_expert_gate and m.qkv_bias and m.moe.renormalize and m.rope_theta == 1e6
    assert m.n_kv_heads == 0 and m.norm_eps == 1e-6 and m.moe.router == "softmax_topk"


@pytest.mark.parametrize("field,value,needle", [
    ("mlp_only_layers", [1], "mlp_only_layers=[1]"),
    ("decoder_sparse_step", 2, "decoder_sparse_step=2"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_parameters.rope_type='yarn'"),
    ("head_dim", 16, "head_dim=16"),
])
def test_fields_moetrain_cannot_express_are_named(field, value, needle):
    from moetrain.hf import HFError, model_config_from_hf

    with pytest.raises(HFError, match="cannot be expressed") as info:
        model_config_from_hf(qwen(**{field: value}))
    assert needle in str(info.value)


def test_ernie_norm_min_large_enough_to_clamp_is_refused():
    from moetrain.hf import HFError, model_config_from_hf

    cfg = {"model_type": "ernie4_5_moe", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 48, "moe_intermediate_size": 16, "moe_num_experts": 8,
           "moe_k": 2}
    assert model_config_from_hf({**cfg, "moe_norm_min": 1e-12}).moe.expert_bias
    with pytest.raises(HFError, match="moe_norm_min=0.5"):
        model_config_from_hf({**cfg, "moe_norm_min": 0.5})


def test_export_refuses_a_model_the_architecture_cannot_express():
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.hf import ARCHS, HFError, hf_config_from_model

    cfg = ModelConfig(vocab_size=300, moe=MoEConfig(num_shared_experts=2))
    with pytest.raises(HFError, match=r"model.moe.num_shared_experts \(2\) cannot be expressed as mixtral"):
        hf_config_from_model(ARCHS["mixtral"], cfg, None, dtype="float32")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe", "ernie4_5_moe"])
def test_the_plan_names_every_parameter_and_buffer_of_the_model(arch, hf_models):
    from moetrain.hf import ARCHS, model_config_from_hf
    from moetrain.hf.tensors import tensor_plan
    from moetrain.model import Transformer

    cfg = model_config_from_hf(json.loads((hf_models[arch] / "config.json").read_text()))
    model = Transformer(cfg, seed=0)
    plan = tensor_plan(ARCHS[arch], cfg)
    dense = {m.target[6:] for m in plan if m.target.startswith("dense:")}
    assert dense == {n for n, _ in model.dense_parameters()}
    buffers = {m.target[7:] for m in plan if m.target.startswith("buffer:")}
    assert buffers == ({n for n, _ in model.named_buffers() if n.endswith("expert_bias_E")}
                       if cfg.moe.expert_bias else set())
    experts = [m for m in plan if m.target.startswith("expert:")]
    assert len(experts) == 3 * cfg.moe.num_experts * model.num_moe_layers
