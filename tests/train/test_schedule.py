"""lr_at (moetrain/train/schedule.py): linear warmup, then cosine to min_lr, by hand.

lr 1.0, min_lr 0.1, 4 warmup steps, 14 total steps: warmup steps 0..3 give 0.25, 0.5, 0.75, 1.0;
the cosine spans steps 4..14 (10 steps): lr(4 + n) = 0.1 + 0.45 * (1 + cos(pi * n / 10)).
"""

from __future__ import annotations

import math

import pytest

from moetrain.train.schedule import lr_at

LR, MIN_LR, WARMUP, TOTAL = 1.0, 0.1, 4, 14


def lr(step: int, **kw) -> float:
    args = {"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "total_steps": TOTAL, **kw}
    return lr_at(step, **args)


def test_linear_warmup_starts_above_zero_and_reaches_lr():
    assert [lr(s) for s in range(WARMUP)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("step,expected", [
    (4, 1.0),  # first decay step: cos(0) = 1, still the peak
    (5, 0.1 + 0.45 * (1 + math.cos(math.pi / 10))),  # 0.97797
    (9, 0.55),  # halfway: (lr + min_lr) / 2
    (13, 0.1 + 0.45 * (1 + math.cos(math.pi * 9 / 10))),  # the last step of a 14-step run: 0.12202
    (14, 0.1),  # total_steps reaches min_lr
    (100, 0.1),  # beyond the end: stays at min_lr
])
def test_cosine_values_by_hand(step, expected):
    assert lr(step) == pytest.approx(expected, abs=1e-12)


def test_cosine_decreases_monotonically_between_lr_and_min_lr():
    values = [lr(s) for s in range(WARMUP, TOTAL + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert max(values) == LR and min(values) == MIN_LR


def test_no_warmup_starts_at_lr():
    assert lr(0, warmup_steps=0) == LR
    assert lr(7, warmup_steps=0) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 14)))


def test_constant_when_min_lr_equals_lr():
    assert {lr(s, min_lr=LR) for s in range(WARMUP, TOTAL + 3)} == {LR}


def test_warmup_as_long_as_the_run():
    """warmup_steps == total_steps: the run only warms up; afterwards min_lr (no division by 0)."""
    assert lr(3, warmup_steps=4, total_steps=4) == LR
    assert lr(4, warmup_steps=4, total_steps=4) == LR  # progress 0 of a 1-step span
    assert lr(5, warmup_steps=4, total_steps=4) == MIN_LR
