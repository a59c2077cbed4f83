"""A step whose loss or gradient norm is NaN/inf applies no update: weights, AdamW state and the
expert bias stay exactly as they were, and the metrics name the quantity."""

from __future__ import annotations

import math

import numpy as np

from moetrain.config import from_dict
from moetrain.train.trainer import RankTrainer, nonfinite_quantities


def test_nonfinite_quantities_names_each_bad_value():
    assert nonfinite_quantities(a=1.0, b=2.0) == ()
    assert nonfinite_quantities(a=math.nan, b=2.0, c=math.inf, d=-math.inf) == ("a", "c", "d")


def test_a_nonfinite_step_changes_nothing(tmp_path):
    cfg = from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16, "expert_bias": True}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 4, "global_batch_size": 8, "lr": 1e4, "min_lr": 0.0, "warmup_steps": 0,
                  "grad_clip": 0.0, "eval_every": 0},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path)},
    })
    t = RankTrainer(cfg)
    first = t.train_step()
    assert not first.skipped
    before = t.export_tensors("param")
    bias = [l.router.expert_bias_E.clone() for l in t.moe_layers]
    adam = {id(p): {k: v.clone() for k, v in st.items()} for p, st in t.optimizer.state.items()}
    second = t.train_step()  # lr 1e4 without clipping: the gradient norm overflows
    assert second.skipped and second.nonfinite == ("grad_norm",) and second.step == 2
    after = t.export_tensors("param")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(b.equal(l.router.expert_bias_E) for b, l in zip(bias, t.moe_layers))
    for p, st in t.optimizer.state.items():
        assert all(v.equal(adam[id(p)][k]) for k, v in st.items())
