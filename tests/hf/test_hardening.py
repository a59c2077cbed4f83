"""Issue #23's Hugging Face cases: special token ids outside the vocabulary, the prepared-data
cache key and the end-of-text id, malformed safetensors headers, the context taken from
``max_position_embeddings`` (and refused past it), ``sliding_window`` not shorter than the context."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from scripts.helpers import update_json
from tests.hf.test_bad_input import assert_one_line, run_cli


@pytest.fixture()
def olmoe_dir(hf_models, tmp_path) -> Path:
    d = tmp_path / "olmoe"
    shutil.copytree(hf_models["olmoe"], d)
    return d


# ---- special ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("eos_token_id", 5000), ("bos_token_id", 300), ("pad_token_id", -1),
                                       ("eos_token_id", [299, 301])])
def test_import_refuses_a_special_id_outside_the_vocabulary(olmoe_dir, tmp_path, capsys, key, value):
    update_json(olmoe_dir / "config.json", **{key: value})
    rc, err = run_cli(["hf", "import", str(olmoe_dir), str(tmp_path / "ck")], capsys)
    bad = value[1] if isinstance(value, list) else value
    assert_one_line(rc, err, "config.json", f"{key} {bad}", "vocab_size 300")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").rglob("manifest.json"))


def test_import_refuses_a_generation_config_eos_outside_the_vocabulary(olmoe_dir, tmp_path, capsys):
    (olmoe_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 512}))
    rc, err = run_cli(["hf", "import", str(olmoe_dir), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "generation_config.json", "eos_token_id 512", "vocab_size 300")


def test_fine_tune_start_refuses_an_eos_outside_the_vocabulary(olmoe_dir, tmp_path, capsys):
    """``moetrain train`` with model.init_from: refused before Ray starts (was an IndexError in
    evaluation, exit 1)."""
    update_json(olmoe_dir / "config.json", eos_token_id=5000)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox\n\n" * 50)
    rc, err = run_cli(["train", "--set", f"model.init_from=hf:{olmoe_dir}", "--set", f"data.tokenizer=hf:{olmoe_dir}",
                       "--set", "data.source=paths", "--set", f"data.paths=text={corpus}", "--set", "data.seq_len=16",
                       "--set", "model.max_seq_len=32", "--set", f"data.cache_dir={tmp_path / 'cache'}"], capsys)
    assert_one_line(rc, err, "eos_token_id 5000", "vocab_size 300")


def test_data_end_of_text_id_outside_the_tokenizer_is_refused(olmoe_dir):
    from moetrain.data import DataError
    from moetrain.data.tokenizer import load_hf_tokenizer

    (olmoe_dir / "tokenizer_config.json").unlink()  # the eos then comes from config.json
    update_json(olmoe_dir / "config.json", eos_token_id=300)
    with pytest.raises(DataError, match=r"end-of-text id 300 is outside the vocabulary .*vocab size 300"):
        load_hf_tokenizer(f"hf:{olmoe_dir}")


# ---- the prepared-data cache key covers the end-of-text id -----------------------------------------


def _separator_model(hf_models, root: Path, eos: int | None) -> Path:
    """The olmoe tokenizer.json byte for byte; eos from tokenizer_config.json (None) or config.json."""
    d = root / f"eos-{eos}"
    shutil.copytree(hf_models["olmoe"], d)
    if eos is not None:
        (d / "tokenizer_config.json").unlink()
        update_json(d / "config.json", eos_token_id=eos)
    return d


def _corpus(tmp_path: Path) -> Path:
    """60 short documents (one per JSONL line), so that the rows hold many separators."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(60)))
    return corpus


@pytest.mark.parametrize("order", ["special-first", "byte-first"])
def test_same_tokenizer_other_eos_does_not_reuse_the_prepared_rows(hf_models, tmp_path, order):
    """Two models, one tokenizer.json, eos 299 (<|endoftext|>) and the id of '~' (absent from
    the text): each one's prepared rows separate documents with its own id, in either order."""
    from tokenizers import Tokenizer

    from moetrain.config import DataConfig
    from moetrain.data.training import open_training_data

    tilde = Tokenizer.from_file(str(hf_models["olmoe"] / "tokenizer.json")).token_to_id("~")
    models = {299: _separator_model(hf_models, tmp_path, None), tilde: _separator_model(hf_models, tmp_path, tilde)}
    corpus = _corpus(tmp_path)
    ids = [299, tilde] if order == "special-first" else [tilde, 299]
    seen = {}
    for eos in ids:
        cfg = DataConfig(source="paths", paths=[f"text={corpus}"], tokenizer=f"hf:{models[eos]}", seq_len=16,
                         cache_dir=str(tmp_path / "cache"))
        data = open_training_data(cfg, 4)
        rows = data.first_train_rows(8)
        other = tilde if eos == 299 else 299
        assert data.eot_id == eos
        assert np.count_nonzero(rows == eos) >= 8 and np.count_nonzero(rows == other) == 0, (eos, rows)
        seen[eos] = rows
    assert len(list((tmp_path / "cache" / "data").glob("prepared-*"))) == 2
    assert np.array_equal(np.where(seen[299] == 299, tilde, seen[299]), seen[tilde])  # only the separator differs


def test_in_memory_dataset_key_covers_the_eos_too(hf_models, tmp_path):
    from tokenizers import Tokenizer

    from moetrain.config import DataConfig
    from moetrain.data import build_dataset

    tilde = Tokenizer.from_file(str(hf_models["olmoe"] / "tokenizer.json")).token_to_id("~")
    corpus = _corpus(tmp_path)
    for eos in (299, tilde):
        d = _separator_model(hf_models, tmp_path, None if eos == 299 else eos)
        ds = build_dataset(DataConfig(source="paths", paths=[f"text={corpus}"], tokenizer=f"hf:{d}", seq_len=16,
                                      cache_dir=str(tmp_path / "cache")))
        assert ds.eot_id == eos and np.count_nonzero(ds.train.tokens_NT1 == eos) > 0


# ---- malformed safetensors headers ---------------------------------------------------------------


def _with_header(d: Path, header: bytes, data: bytes = b"\0" * 64) -> None:
    for p in d.glob("model*.safetensors*"):
        p.unlink()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)


def _entry(**kw) -> bytes:
    meta = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **kw}
    return json.dumps({"model.norm.weight": meta}).encode()


@pytest.mark.parametrize("header,needle", [
    (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
    (b'{"model.norm.weight": {"dtype": "F32",', "not valid JSON"),
    (b'[1, 2, 3]', "is a JSON list, not an object"),
    (json.dumps({"model.norm.weight": "F32"}).encode(), "not an object"),
    (_entry(dtype="Q7"), "dtype Q7"),
    (_entry(shape="2x2"), "shape '2x2'"),
    (_entry(shape=[2, -2]), "shape [2, -2]"),
    (_entry(data_offsets=[16, 0]), "data_offsets [16, 0]"),
    (_entry(data_offsets=[0, 12]), "needs 16 bytes"),
    (_entry(data_offsets=[0, "16"]), "data_offsets [0, '16']"),
    (_entry(shape=[8, 4], data_offsets=[0, 128]), "ends past the end of the file"),
    (json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode(), "tensors a and b overlap"),
])
def test_a_malformed_safetensors_header_is_one_line_naming_the_file(olmoe_dir, tmp_path, capsys, header, needle):
    _with_header(olmoe_dir, header)
    rc, err = run_cli(["hf", "import", str(olmoe_dir), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "model.safetensors", needle)


def test_a_malformed_index_is_one_line(olmoe_dir, tmp_path, capsys):
    (olmoe_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    rc, err = run_cli(["hf", "import", str(olmoe_dir), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "model.safetensors.index.json", "weight_map")
    (olmoe_dir / "model.safetensors.index.json").write_bytes(b"\xff\xfe{")
    rc, err = run_cli(["hf", "import", str(olmoe_dir), str(tmp_path / "ck")], capsys)
    assert_one_line(rc, err, "model.safetensors.index.json", "not valid JSON")


# ---- context length and sliding windows ----------------------------------------------------------


def mixtral(**kw) -> dict:
    base = {"model_type": "mixtral", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 32768}
    return {**base, **kw}


def test_import_takes_the_context_from_max_position_embeddings():
    from moetrain.config import ModelConfig
    from moetrain.hf import HFError, model_config_from_hf
    from moetrain.hf.arch import DEFAULT_CONTEXT

    assert model_config_from_hf(mixtral()).max_seq_len == 32768  # was capped at 4096
    no_field = mixtral()
    del no_field["max_position_embeddings"]
    assert model_config_from_hf(no_field).max_seq_len == DEFAULT_CONTEXT
    assert model_config_from_hf(mixtral(), base=ModelConfig(max_seq_len=512)).max_seq_len == 512  # a fine-tune's own
    with pytest.raises(HFError, match=r"model.max_seq_len \(40000\) exceeds max_position_embeddings \(32768\)"):
        model_config_from_hf(mixtral(), base=ModelConfig(max_seq_len=40000))


@pytest.mark.parametrize("cfg,context,ok", [
    (mixtral(sliding_window=None), 32768, True),
    (mixtral(sliding_window=32768), 32768, True),
    (mixtral(sliding_window=4096), 32768, False),
    (mixtral(sliding_window=4096), 4096, True),  # a fine-tune of 4096 tokens never reaches past the window
    (mixtral(sliding_window=4095), 4096, False),
])
def test_sliding_window_not_shorter_than_the_context_is_accepted(cfg, context, ok):
    from moetrain.config import ModelConfig
    from moetrain.hf import HFError, model_config_from_hf

    base = None if context == 32768 else ModelConfig(max_seq_len=context)
    if ok:
        assert model_config_from_hf(cfg, base=base).max_seq_len == context
    else:
        with pytest.raises(HFError, match=f"sliding_window={cfg['sliding_window']}.*>= the context \\({context}\\)"):
            model_config_from_hf(cfg, base=base)


def test_qwen2_moe_sliding_window_is_read_only_when_switched_on():
    from moetrain.hf import HFError, model_config_from_hf
    from tests.hf.test_bad_input import qwen

    assert model_config_from_hf(qwen(use_sliding_window=False, sliding_window=8, max_position_embeddings=64))
    assert model_config_from_hf(qwen(use_sliding_window=True, sliding_window=64, max_position_embeddings=64))
    with pytest.raises(HFError, match="sliding_window=8"):
        model_config_from_hf(qwen(use_sliding_window=True, sliding_window=8, max_position_embeddings=64))


def test_import_prints_the_context_and_its_cap(hf_models, tmp_path, capsys):
    from cluster.cli import main

    d = tmp_path / "long"
    shutil.copytree(hf_models["mixtral"], d)
    update_json(d / "config.json", max_position_embeddings=32768, sliding_window=32768)  # Mixtral's own values
    assert main(["hf", "import", str(d), str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert f"context: model.max_seq_len 32768 tokens (cap: {d / 'config.json'} max_position_embeddings 32768)" in out


def test_plan_states_the_context_cap_of_an_hf_model(hf_models, capsys):
    from cluster.cli import main

    assert main(["plan", "--set", f"model.init_from=hf:{hf_models['mixtral']}", "--set", "model.max_seq_len=32",
                 "--set", "data.seq_len=16", "--memory-gb", "64"]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("context:")]
    assert line == [f"context: model.max_seq_len 32 tokens (cap: {hf_models['mixtral'] / 'config.json'} "
                    "max_position_embeddings 64)"], out
    rc, err = run_cli(["plan", "--set", f"model.init_from=hf:{hf_models['mixtral']}", "--set", "model.max_seq_len=128",
                       "--memory-gb", "64"], capsys)
    assert_one_line(rc, err, "model.max_seq_len (128) exceeds max_position_embeddings (64)")


def test_generate_refuses_past_the_context_instead_of_cutting(imported, capsys):
    """The tiny models have max_position_embeddings 64: an import's context is 64 tokens."""
    rc, err = run_cli(["generate", imported["olmoe"], "--prompt", "the quick brown", "--max-new-tokens", "62"], capsys)
    assert_one_line(rc, err, "plus --max-new-tokens (62) exceeds the model's context (model.max_seq_len 64)")
    rc, _ = run_cli(["generate", imported["olmoe"], "--prompt", "the quick brown", "--max-new-tokens", "3"], capsys)
    assert rc == 0
