"""Snapshot + async writer + commit + load, end to end on a local dir and on S3."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from moetrain.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointError,
    InvalidNameError,
    SerializationError,
    Snapshot,
    apply_retention,
    commit,
    list_checkpoints,
    load_objects,
    open_store,
    read_latest,
    resolve,
    snapshot,
    verify,
)
from moetrain.config import StoreConfig
from moetrain.storage.store import TMP_MARK
from tests.ports import free_port

from .helpers import assert_same, make_objects


def test_round_trip_of_two_ranks_with_checksums(store):
    objs = [make_objects(rank=r, experts=3) for r in range(2)]
    results = []
    for r in range(2):
        with AsyncCheckpointWriter(store, "run", rank=r) as w:
            results.append(w.save(5, objs[r]).result())
    assert all(res.ok for res in results)
    assert {e.name for e in results[1].entries} == set(objs[1])
    manifest = commit(store, "run", 5, results, meta={"step": 5, "losses": [2.5, 2.1]})
    assert manifest.world_size == 2 and len(manifest.entries) == 10
    ref = resolve("latest", store=store, run="run")
    assert ref.step == 5 and verify(ref).ok
    for r in range(2):  # each rank reads only what it hosts
        loaded = load_objects(ref, sorted(objs[r]))
        for name in objs[r]:
            assert_same(objs[r][name], loaded[name], name)


def test_snapshot_is_detached_from_training(store):
    w_DD = torch.nn.Parameter(torch.ones(4, 4))
    snap = snapshot({"dense/rank-0": {"w": w_DD}})
    with torch.no_grad():
        w_DD.add_(1.0)  # the next optimizer step
    assert snap.nbytes == 64 and not snap.objects["dense/rank-0"]["w"].requires_grad
    assert torch.equal(snap.objects["dense/rank-0"]["w"], torch.ones(4, 4))
    with pytest.raises(InvalidNameError, match="'../escape'"):
        snapshot({"../escape": {}})


@pytest.mark.s3
def test_async_save_returns_long_before_the_upload_ends(s3_server):
    cfg = StoreConfig(s3_endpoint=s3_server.endpoint, s3_region=s3_server.region)
    store = open_store(s3_server.uri("async"), cfg)
    objs = {f"dense/rank-0/part-{i}": {"w": torch.randn(1 << 20)} for i in range(8)}  # 32 MB
    with AsyncCheckpointWriter(store, "run") as w:
        start = time.perf_counter()
        fut = w.save(1, objs)
        save_s = time.perf_counter() - start
        ticks = 0
        while not fut.done():  # the training thread keeps working meanwhile
            ticks += 1
            time.sleep(0.005)
        total_s = time.perf_counter() - start
        result = fut.result()
    assert result.ok and result.bytes_written > 32e6
    assert save_s < 0.2 * total_s, (save_s, total_s)
    assert ticks > 10


def test_one_checkpoint_in_flight_per_rank(store):
    with AsyncCheckpointWriter(store, "run") as w:
        first = w.save(1, make_objects(experts=4, dim=64))
        assert w.in_flight or first.done()
        second = w.save(2, make_objects(experts=4, dim=64, seed=1))
        assert first.done()  # save() waited for the previous checkpoint
        assert second.result().ok
        assert w.wait().step == 2 and w.wait() is None


def _failing_snapshot(objs):
    """A snapshot whose last object raises while its bytes are streamed (a meta tensor has a
    shape and dtype, so the header goes out, but no data)."""
    objs = dict(objs)
    objs["experts/layer-0/expert-9"] = {"w": torch.randn(1 << 20), "bad": torch.empty(64, device="meta")}
    return Snapshot(objects=objs, nbytes=0)


def test_failed_upload_keeps_previous_checkpoint_and_latest(store):
    with AsyncCheckpointWriter(store, "run") as w:
        commit(store, "run", 1, [w.save(1, make_objects()).result()])
        fut = w.save(2, _failing_snapshot(make_objects(seed=2)))
        with pytest.raises(SerializationError, match=r"step-2/experts/layer-0/expert-9"):
            fut.result()
    keys = [f.key for f in store.list_files("run/step-2")]
    assert "run/step-2/experts/layer-0/expert-9" not in keys
    assert not any(TMP_MARK in k for k in keys), keys
    assert read_latest(store, "run") == 1 and verify(resolve("latest", store=store, run="run")).ok


def test_partial_object_left_by_a_failure_is_never_committed_or_loaded(store, monkeypatch):
    """Direct writes: if the best-effort delete of a failed object fails too (store down), the
    partial object stays at its final key. It is not committed, it is rejected by its checksum even
    if someone forged a manifest for it, and retention removes it with its uncommitted step."""
    from moetrain.checkpoint import CorruptObjectError, apply_retention, list_checkpoints
    from moetrain.storage.store import Store
    with AsyncCheckpointWriter(store, "run", on_error="mark") as w:
        good = w.save(1, make_objects()).result()
        commit(store, "run", 1, [good])
        monkeypatch.setattr(Store, "_delete_quietly", lambda self, path: None)
        failed = w.save(2, _failing_snapshot(make_objects(seed=2))).result()
        monkeypatch.undo()
        partial_key = "run/step-2/experts/layer-0/expert-9"
        partial = {f.key: f.size for f in store.list_files("run/step-2")}
        assert partial_key in partial and partial[partial_key] > 4 << 20  # header + 4 MB, no meta data
        assert not failed.ok and "expert-9" in failed.error and failed.entries == ()
        with pytest.raises(CheckpointError, match="rank 0 failed"):
            commit(store, "run", 2, [failed])
        assert read_latest(store, "run") == 1 and not list_checkpoints(store, "run")[1].committed
        # A forged commit of the partial object: its size (listing) or crc32c (reader) gives it away.
        full = w.save(3, {"experts/layer-0/expert-9": {"w": torch.randn(1 << 20)}}).result()
        with pytest.raises(CorruptObjectError, match="size differs"):
            commit(store, "run", 2, [[{**full.entries[0].to_dict()}]])
        store.write_bytes(partial_key, b"x" * full.entries[0].size)  # right size, wrong bytes
        commit(store, "run", 2, [[full.entries[0].to_dict()]])
        ref = resolve(f"{store.uri}/run/step-2", store=store)
        assert not verify(ref).ok and "crc32c" in verify(ref).problems[0]
        with pytest.raises(CorruptObjectError, match="crc32c"):
            load_objects(ref, ["experts/layer-0/expert-9"])
        store.delete("run/step-2/manifest.json")  # un-forge
        commit(store, "run", 3, [full])
    assert read_latest(store, "run") == 3 and verify(resolve("latest", store=store, run="run")).ok
    report = apply_retention(store, "run", keep=2)
    assert report.garbage == (2,) and report.kept == (1, 3) and store.list_files("run/step-2") == []


def test_on_error_mark_reports_without_raising(store, caplog):
    with AsyncCheckpointWriter(store, "run", on_error="mark") as w:
        result = w.save(3, _failing_snapshot(make_objects())).result()
        assert not result.ok and result.error_type == "SerializationError"
        assert "expert-9" in result.error
        assert w.save(4, make_objects()).result().ok  # training goes on; next checkpoint works
    assert "checkpoint failed" in caplog.text
    with pytest.raises(CheckpointError, match="rank 0 failed"):
        commit(store, "run", 3, [result])
    assert read_latest(store, "run") is None


def test_synchronous_mode_writes_in_the_caller(store):
    objs = make_objects()
    w = AsyncCheckpointWriter(store, "run", async_upload=False)
    caller = threading.get_ident()
    fut = w.save(7, objs)
    assert fut.done() and fut.result().ok and threading.get_ident() == caller
    assert {e.name for e in fut.result().entries} == set(objs)
    with pytest.raises(SerializationError, match="expert-9"):
        w.save(8, _failing_snapshot(objs))
    w.close()


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt):
    model(torch.randn(8, 256)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _objects(model, opt):
    return {"dense/rank-0": {"model": model.state_dict(), "optim": opt.state_dict()}}


def test_overlapped_snapshot_with_fence_stores_the_requested_step(store):
    model, opt = _model_and_optimizer()
    _step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with AsyncCheckpointWriter(store, "run", snapshot_mode="overlap") as w:
        w.install_fence(opt)
        fut = w.save(1, _objects(model, opt))
        _step(model, opt)  # optimizer.step() waits for the copy, then changes the weights
        _step(model, opt)
        assert fut.result().ok and fut.result().snapshot_bytes > 3 * 4 * 256 * 256
    commit(store, "run", 1, [fut.result()])
    loaded = load_objects(resolve("latest", store=store, run="run"), ["dense/rank-0"])["dense/rank-0"]
    assert_same(expected, loaded["model"])
    assert not torch.equal(model.state_dict()["0.weight"], expected["0.weight"])


def test_overlapped_snapshot_without_fence_fails_instead_of_tearing(store):
    model, opt = _model_and_optimizer()
    _step(model, opt)
    big = {f"part-{i}": torch.randn(1 << 20) for i in range(32)}  # 128 MB copied first
    objs = {"a/big": big, **_objects(model, opt)}
    with AsyncCheckpointWriter(store, "run", snapshot_mode="overlap", on_error="mark") as w:
        for step in range(3):  # the race is only lost if this thread sleeps through the copy
            w.save(step, objs)
            with torch.no_grad():
                model[3].bias.add_(1.0)  # no fence: changed before the copy reaches it
            result = w.wait()
            if not result.ok:
                break
    assert not result.ok and result.error_type == "TornSnapshotError"
    assert "dense/rank-0['model']['3.bias']" in result.error and "fence" in result.error
    assert store.list_files(f"run/step-{step}") == []


@pytest.mark.s3
def test_unreachable_store_mid_training_is_marked_quickly(s3_server):
    port = free_port()  # nobody listens on it
    cfg = StoreConfig(s3_endpoint=f"http://127.0.0.1:{port}")
    store = open_store("s3://bkt/ckpt", cfg, max_retries=2, probe=False, connect_timeout_s=0.5, backoff_s=0.01)
    start = time.perf_counter()
    with AsyncCheckpointWriter(store, "run", on_error="mark") as w:
        result = w.save(1, make_objects()).result()
    assert time.perf_counter() - start < 10.0
    assert not result.ok and result.error_type == "StoreUnreachableError"
    assert "s3://bkt/ckpt/run/step-1/" in result.error and "after 3 attempts" in result.error


def test_a_committed_step_is_never_overwritten(store):
    with AsyncCheckpointWriter(store, "run", on_error="mark") as w:
        first = w.save(1, make_objects()).result()
        commit(store, "run", 1, [first])
        again = w.save(1, make_objects(seed=9)).result()
    assert not again.ok and "already committed" in again.error
    assert verify(resolve("latest", store=store, run="run")).ok


def test_fence_before_a_data_write_at_the_step_boundary(store):
    """Writes through ``.data`` (expert migration) bypass version counters: the torn-snapshot
    check cannot see them, so such code must call ``writer.fence()`` first."""
    model, opt = _model_and_optimizer()
    _step(model, opt)
    objs = {"dense/rank-0": {"w": model[0].weight.data, "b": model[0].bias.detach()}}
    expected = model[0].weight.detach().clone()
    with AsyncCheckpointWriter(store, "run", snapshot_mode="overlap") as w:
        fut = w.save(1, objs)
        waited = w.fence()  # what Worker.migrate should do before migrate_experts
        model[0].weight.data.mul_(0.0)
        assert fut.result().ok and w.fence_wait_s == pytest.approx(waited)
    commit(store, "run", 1, [fut.result()])
    loaded = load_objects(resolve("latest", store=store, run="run"), ["dense/rank-0"])["dense/rank-0"]
    assert torch.equal(loaded["w"], expected)


def test_atomic_object_writes_remain_available(store):
    objs = make_objects()
    with AsyncCheckpointWriter(store, "run", direct_writes=False) as w:
        result = w.save(1, objs).result()
    commit(store, "run", 1, [result])
    ref = resolve("latest", store=store, run="run")
    assert verify(ref).ok and not any(TMP_MARK in f.key for f in store.list_files("run"))
    loaded = load_objects(ref, sorted(objs))
    for name in objs:
        assert_same(objs[name], loaded[name], name)


_KILLED_WRITER = r"""
import json, sys, time, torch
from moetrain.checkpoint import AsyncCheckpointWriter, commit, open_store
from moetrain.config import StoreConfig
args = json.loads(sys.argv[1])
store = open_store(args["uri"], StoreConfig(**args["cfg"]))
g = torch.Generator().manual_seed(0)
with AsyncCheckpointWriter(store, "run") as w:
    commit(store, "run", 1, [w.save(1, {"dense/rank-0": {"w": torch.randn(1000, generator=g)}}).result()])
    # step 2: 24 experts of 8 MB each, uploaded 4 at a time; never committed unless told
    big = {f"experts/layer-0/expert-{e}": {"w": torch.randn(2 << 20, generator=g)} for e in range(24)}
    fut = w.save(2, big)
    print("saving 2", flush=True)
    result = fut.result()
    print("uploaded 2", flush=True)
    sys.stdin.readline()
    commit(store, "run", 2, [result])
"""


def test_writer_killed_midway_leaves_the_previous_checkpoint_and_latest(store, backend):
    """SIGKILL during an upload: step 1 stays committed, `latest` names it, it loads; the
    half-written step 2 is uncommitted garbage that retention removes after the next commit."""
    cfg = dataclasses.asdict(backend.store_cfg)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, json.dumps({"uri": backend.uri, "cfg": cfg})],
                            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=root))
    try:
        assert proc.stdout.readline().strip() == "saving 2"
        # kill once some of step 2 is on the store (local: objects appear while they are
        # streamed) or after a moment (S3: a multipart upload is invisible until it completes)
        deadline = time.monotonic() + (0.3 if backend.kind == "s3" else 20)
        while time.monotonic() < deadline and not store.list_files("run/step-2"):
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    midway = "uploaded 2" not in rest
    partial = store.list_files("run/step-2")
    total = sum(f.size for f in partial)
    assert read_latest(store, "run") == 1
    ref = resolve("latest", store=store, run="run")
    assert ref.step == 1 and verify(ref).ok
    assert load_objects(ref, ["dense/rank-0"])["dense/rank-0"]["w"].shape == (1000,)
    infos = {i.step: i for i in list_checkpoints(store, "run")}
    assert infos[1].committed and (2 not in infos or not infos[2].committed)
    assert midway, "the upload finished before the kill: make step 2 bigger"
    if backend.kind == "local":
        assert partial and total < 24 * (8 << 20), (len(partial), total)
    # the run goes on: the next checkpoint commits and retention drops the dead step 2
    with AsyncCheckpointWriter(store, "run") as w:
        commit(store, "run", 3, [w.save(3, make_objects()).result()])
    report = apply_retention(store, "run", keep=2)
    assert report.kept == (1, 3) and store.list_files("run/step-2") == []
    assert read_latest(store, "run") == 3


@pytest.mark.gpu
def test_snapshot_of_cuda_tensors_uses_pinned_host_buffers():
    import torch

    from moetrain.checkpoint.snapshot import snapshot

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = torch.randn(1000, 64, device="cuda")
    snap = snapshot({"model": {"w": w, "step": torch.tensor(3)}})
    copied = snap.objects["model"]["w"]
    assert copied.device.type == "cpu" and copied.is_pinned()
    torch.testing.assert_close(copied, w.cpu(), rtol=0, atol=0)
    assert not snap.objects["model"]["step"].is_pinned()  # CPU tensors: plain copies
    assert snap.nbytes == w.numel() * 4 + 8
