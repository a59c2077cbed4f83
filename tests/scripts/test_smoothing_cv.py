"""scripts/experiments/smoothing_cv.py: the smoothed hypergraph by hand, the cross-validation's
determinism and refusals, and the --quick run end to end."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from placement.hypergraph import build_hypergraph
from scripts.helpers import last_json_line

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/experiments/smoothing_cv.py"


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("smoothing_cv", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["smoothing_cv"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_smoothed_objective_by_hand(sm):
    # one token {0, 1, 2}; experts 0, 1 on rank 0 and 2 on rank 1; send weight w = 1/2 per rank
    hg = build_hypergraph(np.array([[0, 1, 2]]), np.ones(3, dtype=np.int64))
    w, rank_V = np.array([0.5, 0.5]), np.array([0, 0, 1])
    assert hg.objective(rank_V, w, 0.0) == pytest.approx(1.0)  # reaches 2 ranks: 2 w
    # alpha = 1/2: half the set (2 w) + half its pairs, each of weight 2/3:
    # {0, 1} one rank (w), {0, 2} and {1, 2} two ranks (2 w each): 2/3 * 5 w
    half = sm.smoothed_hypergraph(hg, 4, 8)
    assert half.objective(rank_V, w, 0.0) == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3) * 2.5)
    # all on one rank: the set costs w, its three pairs 3 x 2/3 x w
    assert half.objective(np.array([0, 0, 0]), w, 0.0) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert (half.weight_H == np.round(half.weight_H)).all()  # integer weights (exact FM gains)
    assert half.num_edges == 4 and sorted(np.diff(half.edge_ptr).tolist()) == [2, 2, 2, 3]
    # alpha = 0 is the fitted objective; the load term is unchanged by the scaling
    zero = sm.smoothed_hypergraph(hg, 0, 8)
    assert zero.objective(rank_V, w, 0.7) == pytest.approx(hg.objective(rank_V, w, 0.7))
    assert half.objective(rank_V, w, 0.7) - half.objective(rank_V, w, 0.0) == pytest.approx(0.7 * 2)


def test_two_pin_tokens_are_their_own_pairs(sm):
    # every set has 2 pins: smoothing changes nothing, at any alpha
    ids = np.array([[0, 1]] * 3 + [[2, 3]] * 3 + [[0, 2]])
    hg = build_hypergraph(ids, np.ones(4, dtype=np.int64))
    w = np.array([0.5, 0.5])
    for rank_V in (np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])):
        for a in (1, 4, 8):
            assert sm.smoothed_hypergraph(hg, a).objective(rank_V, w, 0.0) == pytest.approx(
                hg.objective(rank_V, w, 0.0))


def test_choose_smoothing_is_seeded_and_refuses_bad_input(sm):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 3, replace=False) for _ in range(120)])
    cnt = np.ones(8, dtype=np.int64)
    start = lambda load: np.repeat(np.arange(2), 4)  # noqa: E731
    args = (ids, cnt, start, np.array([0.5, 0.5]), np.array([4, 4]), 0.0, None)
    a = sm.choose_smoothing(*args, np.random.default_rng(3), rounds=2)
    b = sm.choose_smoothing(*args, np.random.default_rng(3), rounds=2)
    assert a == b and a.fits == 16 and not a.capped
    assert a.alpha_num == min(a.scores, key=lambda s: (s[1], s[0]))[0]
    with pytest.raises(ValueError, match="folds"):
        sm.choose_smoothing(*args, np.random.default_rng(3), folds=1)
    with pytest.raises(ValueError, match="alpha"):
        sm.smoothed_hypergraph(build_hypergraph(ids, cnt), 9, 8)


def test_quick_run():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json_line(proc.stdout)
    (case,) = out["cases"]
    assert case["case"] == "synthetic" and len(case["alphas"]) == 1
    assert out["held_better"] + out["held_worse"] + out["held_unchanged"] == 1
