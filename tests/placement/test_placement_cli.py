"""``python -m placement`` on a real trace, and its handling of bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np

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
