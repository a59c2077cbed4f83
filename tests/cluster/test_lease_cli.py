"""Two runs of one name on one store (issue #23, item 5), through the real CLI: while a run holds
the name's lease, ``moetrain train`` with that name is refused in one line, exit 2, before any
actor (or Ray) starts; the store is left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.checkpointing import acquire_lease
from moetrain.checkpoint import Lease, LeaseHeldError, open_store
from moetrain.config import from_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_moetrain_train_is_refused_while_another_run_holds_the_name(tmp_path):
    store = open_store(str(tmp_path / "store"))
    holder = Lease(store, "twin", ttl_s=60.0).acquire()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "train", "--set", "train.steps=2",
             "--set", f"checkpoint.uri={tmp_path / 'store'}", "--set", "cluster.run_name=twin",
             "--set", "data.max_bytes_per_domain=100000", "--set", "data.vocab_size=300",
             "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"logging.out_dir={tmp_path / 'out'}",
             "--set", "logging.wandb=disabled"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env=dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="disabled"))
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("moetrain: error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr
        assert "run 'twin' under" in errors[0] and "being written by another run" in errors[0]
        assert "moetrain ckpt unlock" in errors[0]
        assert "Started a local Ray instance" not in proc.stderr
        holder.verify()  # the refused run did not touch the holder's lease
        assert sorted(p.name for p in (tmp_path / "store" / "twin").iterdir()) == ["lease.json"]
    finally:
        holder.release()


def test_the_lease_ttl_comes_from_the_config(tmp_path):
    cfg = from_dict({"checkpoint": {"uri": str(tmp_path), "lease_ttl_s": 7}, "cluster": {"run_name": "ttl"}})
    lease = acquire_lease(cfg)
    try:
        assert lease.read().ttl_s == 7.0 and lease.ttl_s == 7.0
        with pytest.raises(LeaseHeldError, match=r"\(7 s after its last heartbeat\)"):
            acquire_lease(cfg)
    finally:
        lease.release()
    assert acquire_lease(from_dict({"cluster": {"run_name": "ttl"}})) is None  # no checkpoints: no lease
