"""The time split of a statistics window: what fits and what validates (select.py, 1.).

Owns: :class:`Fold`, :func:`time_folds` (rolling-origin folds cut on step boundaries) and
:func:`newest` (the newest share of a window). Rows are in time order by ``step_T`` (stats.py),
else by row order.

Legend: T tokens (rows of the statistics' ``topk_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.stats import RoutingStats

VAL_FRACTION = 0.25  # share of the window (its newest tokens) that validates
MAX_FOLDS = 2  # validation blocks (rolling origin) where the window and the budget allow
MIN_VAL_TOKENS = 64  # a validation block holds at least this many tokens
MIN_FIT_TOKENS = 64  # a fit part holds at least this many tokens


@dataclass(frozen=True)
class Fold:
    fit_rows: np.ndarray  # row indices of the fit part, oldest first
    val_rows: np.ndarray  # row indices of the validation block


def time_order(stats: RoutingStats) -> tuple[np.ndarray, np.ndarray]:
    """Rows oldest first and their steps (row order when the statistics carry no steps)."""
    T = stats.num_tokens
    if stats.step_T is None:
        return np.arange(T), np.arange(T)
    order = np.argsort(stats.step_T, kind="stable")
    return order, stats.step_T[order]


def snap(step: np.ndarray, pos: int) -> int:
    """The first position of the step holding ``pos`` (cuts fall on step boundaries)."""
    return int(np.searchsorted(step, step[min(pos, len(step) - 1)], side="left")) if pos < len(step) else pos


def time_folds(stats: RoutingStats, val_fraction: float = VAL_FRACTION, folds: int = MAX_FOLDS) -> list[Fold]:
    """The window split by time (module docstring, 1.); [] when it is too small to validate."""
    if stats.topk_ids_TLK is None or not 0 < val_fraction < 1:
        return []
    order, step = time_order(stats)
    T = len(order)
    n_val = int(round(val_fraction * T))
    k = max(min(int(folds), n_val // MIN_VAL_TOKENS), 1)
    cuts = sorted({snap(step, T - n_val + round(j * n_val / k)) for j in range(k)}) + [T]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a >= MIN_FIT_TOKENS and b - a >= MIN_VAL_TOKENS:
            out.append(Fold(order[:a], order[a:b]))
    return out


def newest(stats: RoutingStats, share: float) -> RoutingStats:
    """The newest ``share`` of the rows (cut on a step boundary; all rows when that leaves too few)."""
    order, step = time_order(stats)
    cut = snap(step, int(round((1 - share) * len(order))))
    return stats.take_rows(order[cut:] if len(order) - cut >= MIN_FIT_TOKENS else order)
