"""``python -m placement`` on a real trace, and its handling of bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from placement.placement import Placement

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "placement", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_solves_real_trace_and_writes_json(olmoe_path, tmp_path):
    out = tmp_path / "placement.json"
    proc = _run("--trace", str(olmoe_path), "--ranks", "8", "--ranks-per-node", "4",
                "--time-limit", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for method in ("contiguous", "round_robin", "greedy", "local_search", "ilp"):
        assert method in proc.stdout
    p = Placement.from_json(out.read_text())
    assert p.num_experts == 64 and p.slots_per_rank == (8,) * 8 and p.num_layers == 1
    assert np.array_equal(np.sort(p.phy2log_LS[0]), np.arange(64))


def test_cli_bad_input_is_one_clear_line(tmp_path, olmoe_path):
    proc = _run("--trace", str(tmp_path / "nope.npz"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("--trace", str(olmoe_path), "--ranks", "8", "--slots-per-rank", "7")
    assert proc.returncode == 2 and "cannot hold 64 experts" in proc.stderr
    assert "Traceback" not in proc.stderr


def _one_layer_per_row_trace(path):
    """8 experts, top-2, layers 0 and 12 logged in alternate rows (the other layer -1): layer 0's
    tokens choose {0, 2}, layer 12's {0, 1}."""
    T = 400
    ids = np.full((T, 24, 2), -1, dtype=np.int16)
    ids[0::2, 0] = [0, 2]
    ids[1::2, 12] = [0, 1]
    np.savez(path, topk_ids=ids, layers_present=np.array([0, 12]),
             meta=np.array(json.dumps({"num_experts": 8, "k": 2})))


def test_sends_per_layer_are_divided_by_that_layers_tokens(tmp_path):
    """Contiguous on 4 ranks x 2 slots ({0,1} on rank 0, {2,3} on rank 1): a layer-0 token needs
    ranks 0 and 1 (2 x 3/4 = 1.5 sends), a layer-12 token rank 0 only (0.75). Per layer over that
    layer's 200 tokens: 1.5 and 0.75, mean 1.125 (over all 400 rows it would read 0.5625)."""
    trace = tmp_path / "alternate.npz"
    _one_layer_per_row_trace(trace)
    proc = _run("--trace", str(trace), "--ranks", "4", "--method", "contiguous", "--time-limit", "1")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("contiguous "))
    assert float(line.split()[1]) == pytest.approx(1.125, abs=1e-3)
    assert "contiguous sends/token per layer (each divided by that layer's tokens): 0:1.500 12:0.750" in proc.stdout


def test_slots_per_rank_takes_a_list_and_auto_compares_uneven_with_replicas(tmp_path):
    trace = tmp_path / "alternate.npz"
    _one_layer_per_row_trace(trace)
    out = tmp_path / "p.json"
    proc = _run("--trace", str(trace), "--ranks", "4", "--slots-per-rank", "3,3,1,1", "--method", "greedy",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Placement.from_json(out.read_text()).slots_per_rank == (3, 3, 1, 1)
    # 8 experts on 3 ranks: auto compares (3, 3, 2) with 3 x 3 slots (one replica) by validation
    proc = _run("--trace", str(trace), "--ranks", "3", "--method", "greedy", "--time-limit", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    note = next(ln for ln in proc.stdout.splitlines() if ln.startswith("slots: 8 experts do not divide over 3"))
    assert "uneven" in note and "replicas" in note
    chosen = Placement.from_json(out.read_text()).slots_per_rank
    assert chosen == ((3, 3, 2) if note.split("-> ")[1].startswith("uneven") else (3, 3, 3))
    for bad, msg in (("3,3", "has 2 entries for --ranks 4"), ("3,x,1,1", "comma list of integers")):
        proc = _run("--trace", str(trace), "--ranks", "4", "--slots-per-rank", bad)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr
