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
    # traffic: 2 ranks on one node send everything inside it; the expert all-to-all of both MoE
    # layers and the dense all-reduce are counted, and the summary is the sum of the steps
    traffic = summary["traffic"]
    assert traffic["steps"] == 4 and traffic["inter_node_bytes"] == 0
    assert traffic["bytes_by_kind"]["a2a"]["intra"] == sum(h.traffic.by_kind()["a2a"][0] for h in result.history) > 0
    assert traffic["bytes_by_kind"]["dense_grads"]["intra"] > 0
    assert len(traffic["a2a_bytes_by_layer"]) == 2 and all(row[0] > 0 for row in traffic["a2a_bytes_by_layer"])
    assert b"traffic/a2a/intra" in blob


def test_traffic_totals_and_the_summary_line():
    """Two steps of hand-made traffic: totals by kind, per step and per layer; the printed line."""
    from cluster.telemetry import TrafficTotals, traffic_rows
    from moetrain.parallel.traffic import StepTraffic
    from moetrain.train.summary import format_summary

    a2a = np.zeros((2, 2, 2))
    a2a[0, 0] = [100, 1_000_000]  # layer 0 forward: intra, inter
    a2a[1, 1] = [50, 500_000]  # layer 1 backward
    step = StepTraffic(a2a, np.array([2e6, 1e6]), np.zeros(2), np.array([0, 300.0]), checkpoint_bytes=7e6)
    assert ("a2a", "inter", 1_500_000) in traffic_rows(step) and ("checkpoint", "store", 7e6) in traffic_rows(step)
    totals = TrafficTotals()
    totals.add(step)
    totals.add(step)
    d = totals.to_dict()
    assert d["bytes_by_kind"]["a2a"] == {"intra": 300, "inter": 3_000_000}
    assert d["bytes_by_kind"]["dense_grads"] == {"intra": 4e6, "inter": 2e6}
    assert d["inter_node_bytes"] == 3_000_000 + 2e6 + 600 and d["inter_node_bytes_per_step"] == d["inter_node_bytes"] / 2
    assert d["a2a_bytes_by_layer"] == [[200, 2_000_000], [100, 1_000_000]] and d["checkpoint_upload_bytes"] == 14e6
    summary = {"run_name": "r", "num_workers": 4, "steps": 2, "tokens": 10, "tokens_per_s": 1.0, "wall_s": 1.0,
               "first_loss": 1.0, "last_loss": 1.0, "val_start": {}, "val_loss": {}, "load_LE": [[1, 1]], "traffic": d}
    assert "bytes sent     2.50 MB/step between nodes, 2.00 MB/step inside nodes" in format_summary(summary)
