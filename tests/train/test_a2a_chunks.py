"""``model.moe.a2a_chunks``: the trainer's dispatchers pipeline the all-to-all in that many chunks,
and two training steps give the same losses and parameters as the unchunked path (2 gloo ranks)."""

from __future__ import annotations

import numpy as np

from moetrain.config import load_config
from tests.gloo import run_gloo

BASE = ["model.dim=64", "model.n_heads=4", "model.ffn_dim=128", "model.moe.expert_ffn_dim=64",
        "data.seq_len=32", "model.max_seq_len=32", "train.global_batch_size=8", "train.steps=2",
        "cluster.num_workers=2", "data.max_bytes_per_domain=200000", "placement.initial=round_robin"]


def _two_steps(ctx, chunks: int):
    from moetrain.train.trainer import RankTrainer

    tr = RankTrainer(load_config("tiny", BASE + [f"model.moe.a2a_chunks={chunks}"]), ctx=ctx)
    seen = {layer.dispatcher.chunks for layer in tr.moe_layers}
    losses = [tr.train_step().loss for _ in range(2)]
    return seen, losses, tr.export_tensors()


def test_a2a_chunks_reaches_the_dispatchers_and_keeps_the_math():
    plain = run_gloo(_two_steps, 2, 1)
    chunked = run_gloo(_two_steps, 2, 3)
    for (seen1, loss1, t1), (seen3, loss3, t3) in zip(plain, chunked):
        assert seen1 == {1} and seen3 == {3}
        np.testing.assert_allclose(loss3, loss1, rtol=1e-5)
        for name in t1:
            np.testing.assert_allclose(t3[name], t1[name], rtol=1e-5, atol=1e-5 * np.abs(t1[name]).max(), err_msg=name)
