"""``moetrain hf export --dtype auto|fp32|bf16`` and shards sized like the source: a bf16 model
saved in several shards is imported and exported back in bf16 with as many shards and a proper
index (transformers loads it: the logits of the source, bit for bit); fp32 and bf16 exports load
within their tolerance; ``--max-shard-size`` caps the shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.hf.conftest import hf_logits, rel_err, save_random

TOKENS = torch.randint(0, 299, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory) -> tuple[Path, str]:
    """(a bf16 Mixtral in shards of <= 40 KB, its import)."""
    pytest.importorskip("transformers")
    from moetrain.hf import import_hf

    root = tmp_path_factory.mktemp("bf16")
    src = save_random("mixtral", root / "src", seed=5, dtype=torch.bfloat16, max_shard_size="40KB")
    return src, import_hf(str(src), str(root / "ck"), run="mix").uri


def _shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model*.safetensors"))


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in _shards(d):
        out.update(load_file(str(d / name)))
    return out


def test_bf16_source_exports_bf16_with_the_source_shards(bf16_sharded, tmp_path, capsys):
    from cluster.cli import main

    src, ckpt = bf16_sharded
    assert len(_shards(src)) > 2
    assert main(["hf", "export", ckpt, str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert "dtype bfloat16" in capsys.readouterr().out
    assert len(_shards(out)) == len(_shards(src))  # sized like the source
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == _shards(out)
    theirs, ours = _tensors(src), _tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    assert sorted(ours) == sorted(theirs)
    assert all(ours[n].dtype == torch.bfloat16 and torch.equal(ours[n], theirs[n]) for n in theirs)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(hf_logits(out, TOKENS), hf_logits(src, TOKENS))


def test_dtype_fp32_and_max_shard_size(bf16_sharded, tmp_path):
    from moetrain.hf import export_hf

    src, ckpt = bf16_sharded
    report = export_hf(ckpt, str(tmp_path / "fp32"), dtype="fp32")
    ours, theirs = _tensors(tmp_path / "fp32"), _tensors(src)
    assert all(ours[n].dtype == torch.float32 and torch.equal(ours[n], theirs[n].float()) for n in theirs)
    assert report.files >= len(_shards(src))  # twice the bytes: no shard larger than the source's largest
    assert torch.equal(hf_logits(tmp_path / "fp32", TOKENS), hf_logits(src, TOKENS))  # the upcast is exact
    capped = export_hf(ckpt, str(tmp_path / "capped"), max_shard_bytes=20_000)
    sizes = [(tmp_path / "capped" / n).stat().st_size for n in _shards(tmp_path / "capped")]
    assert capped.files == len(sizes) > len(_shards(src)) and max(sizes) < 20_000 + 4096  # + the header


def test_fp32_model_exported_bf16_loads_within_bf16_tolerance(hf_models, imported, tmp_path):
    from cluster.cli import main

    assert main(["hf", "export", imported["qwen2_moe"], str(tmp_path / "out"), "--dtype", "bf16",
                 "--max-shard-size", "30KB"]) == 0
    ours = _tensors(tmp_path / "out")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert len(_shards(tmp_path / "out")) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    want = hf_logits(hf_models["qwen2_moe"], TOKENS)
    err = rel_err(hf_logits(tmp_path / "out", TOKENS), want)
    assert 0 < err < 3e-2, err


def test_auto_restores_the_source_dtype_per_tensor():
    """A fine-tuned checkpoint holds fp32: ``auto`` gives back the dtypes recorded at import."""
    from moetrain.hf.convert import SourceLayout
    from moetrain.hf.export import _dtype_plan

    layout = SourceLayout("bfloat16", {"bias": "float32"}, shard_bytes=100, shards=2)
    entries = [("w", torch.float32, (2, 2)), ("bias", torch.float32, (4,)), ("ids", torch.int64, (3,))]
    assert [e[1] for e in _dtype_plan(entries, "auto", layout)] == [torch.bfloat16, torch.float32, torch.int64]
    assert [e[1] for e in _dtype_plan(entries, "auto", None)] == [torch.float32, torch.float32, torch.int64]
    assert [e[1] for e in _dtype_plan(entries, "bf16", layout)] == [torch.bfloat16, torch.bfloat16, torch.int64]
    assert SourceLayout.from_dict(layout.to_dict()) == layout


def test_shards_like_the_source_by_hand():
    from moetrain.hf.convert import SourceLayout
    from moetrain.hf.export import _shards_like

    entries = [(f"t{i}", torch.float32, (10,)) for i in range(6)]  # 40 bytes each, 240 in all
    by_name = lambda shards: [[e[0] for e in s] for s in shards]  # noqa: E731
    assert by_name(_shards_like(entries, SourceLayout("float32", {}, 120, 2))) == [["t0", "t1", "t2"],
                                                                                   ["t3", "t4", "t5"]]
    # the source held half the bytes per shard (bf16): 240 / 60 = 4 shards
    assert by_name(_shards_like(entries, SourceLayout("bfloat16", {}, 60, 2))) == [["t0"], ["t1", "t2"], ["t3"],
                                                                                   ["t4", "t5"]]


def test_max_shard_size_parsing():
    from moetrain.hf import HFError
    from moetrain.hf.export import parse_size

    assert [parse_size(x) for x in ("5GB", "500MB", "2GiB", "40KB", "1234", "1.5kb")] == \
        [5 * 10**9, 500 * 10**6, 2 << 30, 40_000, 1234, 1500]
    for bad in ("five", "0", "10XB", "-3MB"):
        with pytest.raises(HFError, match="--max-shard-size"):
            parse_size(bad)


def test_fine_tuned_bf16_model_exports_bf16_like_its_source(bf16_sharded, tmp_path):
    """The reported case: training from ``model.init_from=hf:DIR`` (a bf16 model) writes fp32
    checkpoints; ``auto`` exports bf16 again, in as many shards as DIR (it was fp32, one 4 GB shard)."""
    from moetrain.checkpoint import AsyncCheckpointWriter, commit, open_store
    from moetrain.config import from_dict
    from moetrain.hf import export_hf, model_from_checkpoint
    from moetrain.train.trainer import RankTrainer

    src, _ = bf16_sharded
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x): return x + {i}  # the quick brown fox" for i in range(200)))
    cfg = from_dict({"model": {"init_from": f"hf:{src}", "max_seq_len": 32},
                     "data": {"source": "paths", "paths": [f"text={corpus}"], "tokenizer": f"hf:{src}", "seq_len": 16,
                              "cache_dir": str(tmp_path / "cache")},
                     "train": {"steps": 1, "global_batch_size": 2, "warmup_steps": 1, "eval_every": 0},
                     "cluster": {"num_workers": 1, "run_name": "ft"}, "logging": {"wandb": "disabled"}})
    trainer = RankTrainer(cfg)
    trainer.train_step()
    store = open_store(str(tmp_path / "ck"))
    with AsyncCheckpointWriter(store, "ft", async_upload=False) as writer:
        result = writer.save(1, trainer.checkpointer.objects()).result()
    commit(store, "ft", 1, [result], {"config": trainer.cfg.to_dict(), "placement": trainer.placement.to_json(),
                                      "cursor": {}, "step": 1})
    assert trainer.model.tok_embed_VD.dtype == torch.float32
    report = export_hf(str(tmp_path / "ck" / "ft"), str(tmp_path / "out"))
    assert {t.dtype for t in _tensors(tmp_path / "out").values()} == {torch.bfloat16}
    assert report.files == len(_shards(src)) and "dtype bfloat16" in report.note
    model, _, _ = model_from_checkpoint(str(tmp_path / "ck" / "ft"))
    with torch.no_grad():
        for p in model.parameters():  # the checkpoint's weights rounded to bf16, as exported
            p.copy_(p.bfloat16().float())
        ours, _ = model(TOKENS)
    assert rel_err(hf_logits(tmp_path / "out", TOKENS), ours) < 1e-5
