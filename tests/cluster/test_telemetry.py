"""What a run leaves for people to look at: the wandb offline run (metrics + heatmap image),
the heatmap PNG, the routing statistics in the trace format, and the summary."""

from __future__ import annotations

import glob
import json
import time

import numpy as np
import pytest

from cluster.api import run
from moetrain.config import from_dict
from placement import load_routing

pytestmark = [pytest.mark.ray]


def test_wandb_offline_run_holds_metrics_and_heatmap(tmp_path, ray_local):
    cfg = from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 4, "global_batch_size": 8, "eval_every": 0},
        "cluster": {"num_workers": 2, "run_name": "wb"},
        "logging": {"wandb": "offline", "out_dir": str(tmp_path)},
    })
    result = run(cfg)
    out = tmp_path / "wb"
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    keys = (b"lm_loss", b"tokens_per_s", b"expert_load_max_over_mean/layer1", b"val_loss/english",
            b"expert_load_heatmap", b"placement")
    deadline = time.monotonic() + 20  # wandb-core may still be flushing the offline file
    while True:
        blob = open(runs[0], "rb").read()
        if all(k in blob for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in blob, key
    assert json.dumps(result.history[-1].lm_loss).encode() in blob  # the logged value itself
    images = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "images" / "expert_load_heatmap*.png"))
    assert images and open(images[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "expert_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # routing.npz is in the trace format: the placement library reads it like the real traces.
    stats = load_routing(str(out / "routing.npz"))
    assert stats.num_experts == 8 and stats.num_layers == 2
    np.testing.assert_array_equal(np.asarray(stats.load_LE), np.asarray(result.summary["load_LE"]))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["val_loss"]) == {"code", "english"} and summary["steps"] == 4
