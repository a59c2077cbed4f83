"""Every CPU sibling of a published shape trains: two optimizer steps of the real training step on
one process, finite losses and a changed parameter (the published shapes themselves are checked
by tests/test_plan.py without building them)."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config import load_config

MINIS = ("olmoe-1b-7b-mini", "qwen15-moe-a2.7b-mini", "mixtral-8x7b-mini", "deepseek-moe-16b-mini")


@pytest.mark.slow
@pytest.mark.parametrize("name", MINIS)
def test_mini_sibling_trains_two_steps(name):
    from moetrain.train.trainer import RankTrainer

    torch.set_num_threads(1)
    cfg = load_config(name, ["cluster.num_workers=1", "train.global_batch_size=4", "data.max_bytes_per_domain=300000"])
    trainer = RankTrainer(cfg)
    before = trainer.model.tok_embed_VD.detach().clone()
    metrics = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(m.loss) and not m.nonfinite for m in metrics)
    assert not torch.equal(before, trainer.model.tok_embed_VD.detach())
