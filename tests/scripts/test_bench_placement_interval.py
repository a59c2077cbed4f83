"""bench_placement's paired-bootstrap interval of a held-out difference: hand-checkable cases."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_placement", ROOT / "scripts/bench/bench_placement.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_placement"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_constant_difference_has_a_point_interval(bench):
    a = np.array([1.5, 0.5, 2.0, 1.0])
    assert bench.paired_interval(a, a - 0.25) == (pytest.approx(0.25), pytest.approx(0.25), pytest.approx(0.25))


def test_interval_is_paired_seeded_and_brackets_the_mean(bench):
    rng = np.random.default_rng(1)
    b = rng.random(400) * 3
    a = b + rng.choice([-1.0, 0.0, 1.0], 400, p=[0.2, 0.5, 0.3])  # mean difference ~ +0.1
    diff, lo, hi = bench.paired_interval(a, b)
    assert diff == pytest.approx((a - b).mean())
    assert lo < diff < hi
    # paired: the spread comes from the differences (sd ~0.7), not from b's own spread
    sd = (a - b).std()
    assert hi - lo == pytest.approx(2 * 1.96 * sd / np.sqrt(400), rel=0.15)
    assert bench.paired_interval(a, b) == (diff, lo, hi)  # seeded
    # one token of 1000 worse by 1: the gap is far inside the noise of a 1000-token sample
    d = np.zeros(1000)
    d[:30], d[30:59] = 1.0, -1.0  # 30 tokens worse, 29 better
    diff, lo, hi = bench.paired_interval(d, np.zeros(1000))
    assert diff == pytest.approx(0.001) and lo < 0 < hi


def test_bad_input_is_refused(bench):
    with pytest.raises(ValueError, match="paired_interval"):
        bench.paired_interval(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="paired_interval"):
        bench.paired_interval(np.zeros(0), np.zeros(0))
