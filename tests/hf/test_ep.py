"""Hugging Face weights under expert parallelism, on real gloo process groups.

- every rank of a non-contiguous (random) placement loads only its experts from the HF
  directory (``load_hf_weights``, the ``model.init_from`` path) and the all-to-all model gives
  transformers' logits (1e-5 relative), on 2 and 4 ranks;
- 2 ranks train 5 steps from ``model.init_from=hf:DIR`` with ``data.tokenizer=hf:DIR``, save a
  checkpoint, the test commits it and exports it; transformers' logits on the export equal
  moetrain's on the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gloo import run_gloo
from tests.hf.conftest import ARCHS, hf_logits, rel_err

TOKENS = torch.randint(0, 299, (2, 10), generator=torch.Generator().manual_seed(3))
STEPS = 5


def _ep_logits(ctx, dirs: dict[str, str], tokens: torch.Tensor) -> dict:
    from moetrain.hf import model_config_from_hf
    from moetrain.hf.load import load_hf_weights
    from moetrain.hf.safetensors_io import CONFIG, open_dir, read_json
    from moetrain.model import Transformer, count_moe_blocks
    from moetrain.parallel.dispatcher import AllToAllDispatcher
    from placement.placement import Placement

    out = {}
    for arch, d in dirs.items():
        cfg = model_config_from_hf(read_json(open_dir(d), CONFIG))
        placement = Placement.random(count_moe_blocks(cfg), cfg.moe.num_experts, ctx.world_size, seed=5)
        model = Transformer(cfg, seed=0, placement=placement, rank=ctx.rank)
        load_hf_weights(model, d)
        for idx, layer in enumerate(model.moe_layers()):
            layer.dispatcher = AllToAllDispatcher(placement, idx, ctx)
        with torch.no_grad():
            logits, _ = model(tokens)
        held = sorted(int(e) for e in placement.local_experts(0, ctx.rank))
        out[arch] = (logits.numpy(), held)  # numpy: tensors do not survive the queue
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_ep_logits_equal_transformers_on_a_random_placement(world_size, hf_models):
    dirs = {arch: str(d) for arch, d in hf_models.items()}
    per_rank = run_gloo(_ep_logits, world_size, dirs, TOKENS)
    for arch in ARCHS:
        want = hf_logits(hf_models[arch], TOKENS)
        held = [r[arch][1] for r in per_rank]
        assert sorted(e for h in held for e in h) == list(range(8))  # each rank read only its own
        assert held != [list(range(r * 8 // world_size, (r + 1) * 8 // world_size)) for r in range(world_size)]
        for r in per_rank:
            assert rel_err(torch.from_numpy(r[arch][0]), want) < 1e-5, arch


def _train_and_save(ctx, cfg_dicts: dict, root: str) -> dict:
    from moetrain.checkpoint import AsyncCheckpointWriter, open_store
    from moetrain.config import from_dict
    from moetrain.hf.load import resolve_init_from
    from moetrain.model import count_moe_blocks
    from placement.placement import Placement
    from moetrain.train.trainer import RankTrainer

    out = {}
    for arch, cfg_dict in cfg_dicts.items():
        cfg = from_dict(cfg_dict)
        model_cfg = resolve_init_from(cfg).model
        placement = Placement.random(count_moe_blocks(model_cfg), 8, ctx.world_size, seed=1)
        trainer = RankTrainer(cfg, ctx=ctx, placement=placement)
        losses = [trainer.train_step().lm_loss for _ in range(STEPS)]
        with AsyncCheckpointWriter(open_store(root), cfg.cluster.run_name, rank=ctx.rank,
                                   async_upload=False) as writer:
            result = writer.save(STEPS, trainer.checkpointer.objects()).result()
        out[arch] = (result, trainer.cfg.to_dict(), placement.to_json(), losses)
    return out


def _run_cfg(arch: str, hf_dir: Path, corpus: Path, cache: Path) -> dict:
    return {
        "model": {"init_from": f"hf:{hf_dir}", "max_seq_len": 32},
        "data": {"source": "paths", "paths": [f"text={corpus}"], "tokenizer": f"hf:{hf_dir}", "seq_len": 16,
                 "cache_dir": str(cache)},
        "train": {"steps": STEPS, "global_batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "eval_every": 0},
        "cluster": {"num_workers": 2, "run_name": arch.replace("_", "-")},
        "logging": {"wandb": "disabled"},
    }


def test_train_5_ep_steps_from_hf_then_export_loads_in_transformers(hf_models, tmp_path):
    from moetrain.checkpoint import commit, open_store
    from moetrain.hf import export_hf, model_from_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x): return x + {i}  # the quick brown fox" for i in range(400)))
    cfgs = {arch: _run_cfg(arch, d, corpus, tmp_path / "cache") for arch, d in hf_models.items()}
    root = tmp_path / "ckpt"
    per_rank = run_gloo(_train_and_save, 2, cfgs, str(root))
    store = open_store(str(root))
    for arch in ARCHS:
        results = [r[arch][0] for r in per_rank]
        cfg_dict, placement, losses = per_rank[0][arch][1:]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (arch, losses)
        run = arch.replace("_", "-")
        commit(store, run, STEPS, results, {"config": cfg_dict, "placement": placement, "cursor": {}, "step": STEPS})
        out = tmp_path / f"export-{arch}"
        export_hf(str(root / run), str(out))
        model, _, _ = model_from_checkpoint(str(root / run))
        with torch.no_grad():
            ours, _ = model(TOKENS)
        assert not torch.equal(ours, hf_logits(hf_models[arch], TOKENS))  # training moved the weights
        assert rel_err(hf_logits(out, TOKENS), ours) < 1e-5, arch
        assert (out / "tokenizer.json").is_file()


def test_a_resumed_rank_does_not_read_the_init_from_weights(hf_models, tmp_path):
    # init_from's shape always applies; its weights only when the rank starts fresh (a resumed rank
    # overwrites them from the checkpoint, so reading them first would be wasted I/O)
    from moetrain.config import from_dict
    from moetrain.train.trainer import RankTrainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def g{i}(y): return y * {i}" for i in range(200)))
    run = _run_cfg("olmoe", hf_models["olmoe"], corpus, tmp_path / "cache")
    cfg = from_dict({**run, "cluster": {"num_workers": 1}})
    fresh = RankTrainer(cfg)
    resumed = RankTrainer(cfg, load_init_weights=False)
    assert fresh.cfg.model == resumed.cfg.model  # the same HF shape
    with torch.no_grad():
        assert rel_err(fresh.model(TOKENS)[0], hf_logits(hf_models["olmoe"], TOKENS)) < 1e-5
        assert not torch.equal(fresh.model.tok_embed_VD, resumed.model.tok_embed_VD)
