"""Shared fixtures: one small build of the real builtin corpus, cached in a tmp dir."""

from __future__ import annotations

import time

import pytest

from moetrain.config import DataConfig
from moetrain.data import build_dataset

SMALL_CAP = 300_000  # bytes per domain: both stdlib code and pydoc prose exceed it
SMALL_VOCAB = 512
SMALL_SEQ = 64


def small_cfg(cache_dir, **overrides) -> DataConfig:
    base = dict(max_bytes_per_domain=SMALL_CAP, vocab_size=SMALL_VOCAB, seq_len=SMALL_SEQ,
                cache_dir=str(cache_dir))
    base.update(overrides)
    return DataConfig(**base)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(cfg, dataset, cold build seconds) for the small builtin corpus, built once per session."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = small_cfg(cache)
    t0 = time.perf_counter()
    ds = build_dataset(cfg)
    return cfg, ds, time.perf_counter() - t0
