"""The README's worked example end to end, as a user runs it: ``moetrain hf import``, ``moetrain
train`` from the HF weights on 2 Ray actors with the model's own tokenizer, ``moetrain hf
export``, then transformers loads the export and its logits equal moetrain's on the checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hf.conftest import hf_logits, rel_err

REPO = Path(__file__).resolve().parents[2]


def moetrain(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.ray
@pytest.mark.slow
def test_import_train_on_two_actors_export_load_in_transformers(hf_models, tmp_path):
    from moetrain.hf import model_from_checkpoint

    hf_dir = hf_models["olmoe"]
    moetrain("hf", "import", str(hf_dir), str(tmp_path / "ckpt"), "--run", "olmoe-base")
    moetrain("generate", str(tmp_path / "ckpt" / "olmoe-base"), "--prompt", "the quick", "--max-new-tokens", "4")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x): return x + {i}  # the quick brown fox" for i in range(400)))
    moetrain("train", "--set", f"model.init_from=hf:{hf_dir}", "--set", f"data.tokenizer=hf:{hf_dir}",
             "--set", "data.source=paths", "--set", f"data.paths=text={corpus}", "--set", "data.seq_len=16",
             "--set", "model.max_seq_len=32", "--set", "cluster.num_workers=2", "--set", "train.steps=5",
             "--set", "train.global_batch_size=4", "--set", "train.eval_every=0", "--set", "train.warmup_steps=1",
             "--set", f"checkpoint.uri={tmp_path / 'ckpt'}", "--set", "cluster.run_name=olmoe-ft",
             "--set", f"logging.out_dir={tmp_path / 'runs'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
             "--set", "placement.initial=round_robin")
    out = tmp_path / "olmoe-ft-hf"
    moetrain("hf", "export", str(tmp_path / "ckpt" / "olmoe-ft"), str(out))
    tokens = torch.randint(0, 299, (2, 10), generator=torch.Generator().manual_seed(5))
    model, _, _ = model_from_checkpoint(str(tmp_path / "ckpt" / "olmoe-ft"))
    with torch.no_grad():
        ours, _ = model(tokens)
    assert not torch.equal(ours, hf_logits(hf_dir, tokens))  # 5 steps moved the weights
    assert rel_err(hf_logits(out, tokens), ours) < 1e-5
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
