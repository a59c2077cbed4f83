"""Shared fixtures: the real routing traces beside the repository (../shared/traces, or the
folder named by ``MOETRAIN_TRACES``)."""

from pathlib import Path

import pytest

from scripts.helpers import TRACES


def _trace(name: str) -> Path:
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"trace {path} not present")
    return path


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _trace("qwen15moe_gsm8k25_5layers.npz")


@pytest.fixture(scope="session")
def olmoe_path() -> Path:
    return _trace("olmoe1b7b_gsm8k25_layer0.npz")


@pytest.fixture(scope="session")
def qwen(qwen_path):
    from placement.stats import load_routing
    return load_routing(qwen_path)
