"""scripts/bench/bench_fault_domain.py: skips cleanly without traces; one case on synthetic statistics."""

from __future__ import annotations

import json

import numpy as np

from placement import from_topk_ids
from scripts.bench import bench_fault_domain as bench


def test_without_traces_it_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "TRACES", tmp_path)
    assert bench.main([]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["skipped"] == "no traces" and line["rows"] == []


def test_one_case_reports_single_homed_and_the_increase():
    rng = np.random.default_rng(0)
    E = 16
    p = rng.dirichlet(np.ones(E))
    ids = np.stack([rng.choice(E, 2, replace=False, p=p) for _ in range(400)])[:, None, :]
    row = bench.run_case("synthetic", from_topk_ids(ids, E), spare=1, time_limit_s=0.5, load_weight=1.0)
    assert row["slots_per_rank"] == 3 and row["multi_homed_allowed"] == 8  # 24 slots, 16 experts
    assert row["node"]["single_homed_experts"] == E - 8
    assert row["none"]["single_homed_experts"] >= E - 8
    assert set(row["increase"]) == {"objective", "fit_objective", "cross_node_sends", "traffic", "imbalance"}
    assert "node vs none" in bench.table([row])
