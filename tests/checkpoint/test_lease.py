"""The lease on a run name (issue #23, item 5): one writer per ``<root>/<run>``; a second one is
refused at start and cannot commit; a dead writer's lease is taken over once it expires; and
``latest`` never moves backwards. On a local directory and the S3 server (and GCS when present)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import (
    AsyncCheckpointWriter, CheckpointError, Lease, LeaseHeldError, LeaseLostError, commit, open_root, read_latest,
)
from moetrain.checkpoint.lease import lease_key, unlock
from moetrain.checkpoint.layout import MANIFEST, step_prefix

ROOT = Path(__file__).resolve().parents[2]


def _lease(store, ttl_s: float = 30.0) -> Lease:
    return Lease(store, "r", ttl_s=ttl_s, settle_s=0.2)


def _save(store, step: int):
    with AsyncCheckpointWriter(store, "r", async_upload=False) as w:
        return w.save(step, {"x.pt": {"t": torch.full((2,), float(step))}}).result()


@pytest.mark.parametrize("first", ["a", "b"])
def test_the_second_writer_is_refused_and_the_first_commits(store, first):
    leases = {"a": _lease(store), "b": _lease(store)}
    second = "b" if first == "a" else "a"
    holder = leases[first].acquire()
    try:
        with pytest.raises(LeaseHeldError, match=r"being written by another run .*expires \d+ s from now .*"
                                                 r"moetrain ckpt unlock .*/r`"):
            leases[second].acquire()
        assert not leases[second].held
        # the refused writer cannot commit either; the holder can
        with pytest.raises(LeaseLostError, match="holds no lease"):
            commit(store, "r", 1, [_save(store, 1)], {}, lease=leases[second])
        assert not store.exists(f"{step_prefix('r', 1)}/{MANIFEST}")
        commit(store, "r", 1, [_save(store, 1)], {}, lease=holder)
        assert read_latest(store, "r") == 1
    finally:
        holder.release()
    assert not store.exists(lease_key("r"))  # released at the end
    leases[second].acquire().release()  # and free for the next run


def test_concurrent_starts_leave_one_holder(store):
    leases = [_lease(store) for _ in range(3)]
    barrier = threading.Barrier(len(leases))
    outcome: dict[int, str] = {}

    def start(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire()
            outcome[i] = "held"
        except LeaseHeldError:
            outcome[i] = "refused"

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "held" in outcome.values()
    # exactly one may commit: the one whose lease is in the store (on a local directory the
    # exclusive create makes it the only one that believes it holds it; on an object store a
    # writer whose write came later than the others' re-read may believe so until it checks)
    assert sum(_holds(lease) for lease in leases) == 1
    if store.kind == "local":
        assert sorted(outcome.values()) == ["held", "refused", "refused"]
    for lease in leases:
        lease.release()


def _holds(lease: Lease) -> bool:
    try:
        lease.verify()
        return True
    except LeaseLostError:
        return False


def test_a_writer_whose_lease_was_taken_cannot_commit(store):
    a = _lease(store).acquire()
    try:
        unlock(store, "r")  # `moetrain ckpt unlock`, then another run starts
        b = _lease(store).acquire()
        with pytest.raises(LeaseLostError, match="was taken by host"):
            commit(store, "r", 2, [_save(store, 2)], {}, lease=a)
        assert read_latest(store, "r") is None
        b.release()
    finally:
        a.release()


def test_heartbeat_keeps_a_short_lease_alive(store):
    # ttl 2 s, renewed every 0.5 s: a heartbeat may take a second on a loaded 2-core machine (S3 /
    # GCS emulators) without the lease lapsing; 0.6 s made the S3 case fail there once
    a = _lease(store, ttl_s=2.0).acquire()
    try:
        time.sleep(4.5)  # > 2 ttl: alive only through the heartbeat
        with pytest.raises(LeaseHeldError):
            _lease(store).acquire()
        a.verify()
    finally:
        a.release()


def test_latest_never_moves_backwards(store):
    commit(store, "r", 4, [_save(store, 4)], {})
    with pytest.raises(CheckpointError, match="already names the committed step 4 .*never moves backwards"):
        commit(store, "r", 2, [_save(store, 2)], {})
    assert read_latest(store, "r") == 4
    assert not store.exists(f"{step_prefix('r', 2)}/{MANIFEST}")
    commit(store, "r", 6, [_save(store, 6)], {})
    assert read_latest(store, "r") == 6


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from moetrain.checkpoint import Lease, open_store
from moetrain.config import StoreConfig
cfg = StoreConfig(s3_endpoint=sys.argv[3], gcs_endpoint=sys.argv[4])
Lease(open_store(sys.argv[2], cfg), "r", ttl_s=float(sys.argv[5])).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_lease_of_a_killed_run_is_taken_over_once_expired(backend):
    ttl = 2.0
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT), backend.uri, backend.store_cfg.s3_endpoint,
                             backend.store_cfg.gcs_endpoint, str(ttl)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no release: the lease stays behind
        proc.wait()
    store = open_root(backend.uri, backend.cfg, backend.store_cfg)
    with pytest.raises(LeaseHeldError, match=r"expires \d+ s from now \(2 s after its last heartbeat\)"):
        _lease(store).acquire()
    deadline = time.monotonic() + 3 * ttl
    while True:
        try:
            lease = _lease(store).acquire()
            break
        except LeaseHeldError:
            assert time.monotonic() < deadline, "the dead run's lease never expired"
            time.sleep(0.5)
    assert store.exists(lease_key("r"))
    lease.release()


def test_local_takeover_of_a_stale_lease_has_one_winner(tmp_path):
    from moetrain.checkpoint import open_store

    store = open_store(str(tmp_path / "ckpt"))
    dead = Lease(store, "r", ttl_s=1.0).acquire()
    dead._stop.set()  # a holder that stops beating (as if killed)
    dead._thread.join()
    time.sleep(1.2)
    leases = [Lease(store, "r", ttl_s=30.0) for _ in range(4)]
    barrier = threading.Barrier(len(leases))
    held = []

    def take(lease: Lease) -> None:
        barrier.wait()
        try:
            held.append(lease.acquire())
        except LeaseHeldError:
            pass

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) >= 1 and sum(_holds(lease) for lease in leases) == 1
    assert sorted(p.name for p in (tmp_path / "ckpt" / "r").iterdir()) == ["lease.json"]  # nothing left aside
    for lease in leases:
        lease.release()
