"""Helpers of the checkpoint tests: objects shaped like training's, deep equality."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def make_objects(rank: int = 0, *, experts: int = 2, dim: int = 16, seed: int = 0) -> dict[str, Any]:
    """One rank's objects shaped like training's: dense + optimizer, experts, RNG."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    objs: dict[str, Any] = {
        f"dense/rank-{rank}": {
            "model": {"w_DD": torch.randn(dim, dim, generator=g), "b_D": torch.randn(dim, generator=g)},
            "optim": {"state": {0: {"step": torch.tensor(3.0),
                                    "exp_avg": torch.randn(dim, dim, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
        },
        f"rng/rank-{rank}": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "seed": seed},
    }
    for e in range(experts):
        objs[f"experts/layer-0/expert-{rank * experts + e}"] = {
            "w1_DF": torch.randn(dim, 2 * dim, generator=g).to(torch.bfloat16),
            "exp_avg": torch.randn(dim, 2 * dim, generator=g), "step": 7}
    return objs


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality with tensors / arrays compared by dtype, shape and value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where
