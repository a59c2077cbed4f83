"""Commit protocol (manifest last, then latest) and retention / garbage collection."""

from __future__ import annotations

import json
import os
import sys

import pytest

from moetrain.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointError,
    ObjectNotFoundError,
    apply_retention,
    clean,
    commit,
    list_checkpoints,
    read_latest,
    read_manifest,
    resolve,
)
from moetrain.checkpoint import open_store
from moetrain.checkpoint.layout import CheckpointRef
from moetrain.checkpoint.retention import CheckpointInfo, plan_retention

from moetrain.config import StoreConfig

from .helpers import make_objects


def _save(store, step, run="run", ranks=1, **kw):
    results = []
    for r in range(ranks):
        with AsyncCheckpointWriter(store, run, rank=r) as w:
            results.append(w.save(step, make_objects(rank=r, experts=1, dim=4, **kw)).result())
    return results


def _checkpoint(store, step, run="run"):
    return commit(store, run, step, _save(store, step, run), meta={"step": step})


def test_commit_writes_manifest_then_latest(store):
    results = _save(store, 3, ranks=2)
    assert read_latest(store, "run") is None
    manifest = commit(store, "run", 3, results, meta={"step": 3, "placement": {"phy2log": [[0, 1]]}})
    assert read_latest(store, "run") == 3
    on_store = json.loads(store.read_bytes("run/step-3/manifest.json"))
    assert on_store["world_size"] == 2 and on_store["meta"]["placement"] == {"phy2log": [[0, 1]]}
    assert on_store["total_bytes"] == sum(e.size for r in results for e in r.entries)
    assert read_manifest(CheckpointRef(store, "run", 3)) == manifest
    _checkpoint(store, 4)
    assert read_latest(store, "run") == 4


def test_commit_accepts_plain_dict_entries(store):
    (result,) = _save(store, 1)
    manifest = commit(store, "run", 1, [[e.to_dict() for e in result.entries]])
    assert manifest.entries == result.entries


def test_commit_refuses_missing_objects_and_leaves_latest(store):
    _checkpoint(store, 1)
    (result,) = _save(store, 2)
    store.delete("run/step-2/rng/rank-0")
    with pytest.raises(ObjectNotFoundError, match="rng/rank-0"):
        commit(store, "run", 2, [result])
    assert read_latest(store, "run") == 1 and not store.exists("run/step-2/manifest.json")


def test_commit_refuses_conflicting_owners_and_bad_meta(store):
    a, = _save(store, 1)
    b, = _save(store, 1, seed=5)  # same names, other bytes (rank 0 twice)
    with pytest.raises(CheckpointError, match="written twice"):
        commit(store, "run", 1, [a, b])
    with pytest.raises(CheckpointError, match="meta is not JSON"):
        commit(store, "run", 1, [b], meta={"bad": object()})
    assert read_latest(store, "run") is None


def _info(step, committed):
    return CheckpointInfo(run="r", step=step, committed=committed, size=1, objects=1, tmp_objects=0, uri="")


def test_plan_retention_rules():
    infos = [_info(s, c) for s, c in [(1, True), (2, False), (3, True), (4, True), (5, True), (9, False)]]
    assert plan_retention(infos, 2, latest=5) == ([4, 5], [1, 3], [2])  # 9 may be in flight
    assert plan_retention(infos, 1, latest=3) == ([3, 5], [1, 4], [2])  # newest + latest kept
    assert plan_retention(infos, None, latest=5) == ([1, 3, 4, 5], [], [2])
    assert plan_retention([_info(2, False)], 1, latest=None) == ([], [], [])  # nothing committed
    with pytest.raises(CheckpointError, match="keep"):
        plan_retention(infos, 0, latest=5)


def test_retention_keeps_n_and_the_newest(store):
    _save(store, 0)  # uncommitted, older than the newest commit: garbage
    for step in (1, 2, 3, 4):
        _checkpoint(store, step)
    _save(store, 9)  # uncommitted, newer: possibly in flight, kept
    report = apply_retention(store, "run", keep=2)
    assert (report.kept, report.deleted, report.garbage) == ((3, 4), (1, 2), (0,))
    listed = [(i.step, i.committed) for i in list_checkpoints(store, "run")]
    assert listed == [(3, True), (4, True), (9, False)]
    assert resolve("latest", store=store, run="run").step == 4
    apply_retention(store, "run", keep=1)
    assert [i.step for i in list_checkpoints(store, "run") if i.committed] == [4]


def test_clean_removes_stray_temporaries(store):
    _checkpoint(store, 1)
    store.write_bytes("run/step-1/experts/layer-0/expert-0.tmp-0123456789ab", b"left by a crash")
    assert list_checkpoints(store, "run")[0].tmp_objects == 1
    report = clean(store, "run")
    assert report.tmp_deleted == ("run/step-1/experts/layer-0/expert-0.tmp-0123456789ab",)
    assert list_checkpoints(store, "run")[0].tmp_objects == 0 and report.kept == (1,)


@pytest.mark.s3
def test_clean_aborts_pending_multipart_uploads(s3_server):
    from moetrain.checkpoint import open_store
    store = open_store(s3_server.uri("mpu"), StoreConfig(s3_endpoint=s3_server.endpoint))
    client = s3_server.client()
    # What a SIGKILLed writer leaves: an initiated multipart upload of an object (written
    # directly to its final key) or of a commit record's temporary key.
    ours = ("mpu/run/step-1/dense/rank-0", "mpu/run/step-1/manifest.json.tmp-00000000aaaa")
    others = ("mpu/run/notes/not-a-step", "mpu/run2/step-1/dense/rank-0")
    for key in ours + others:
        up = client.create_multipart_upload(Bucket=s3_server.bucket, Key=key)
        client.upload_part(Bucket=s3_server.bucket, Key=key, UploadId=up["UploadId"],
                           PartNumber=1, Body=b"x" * 1024)
    report = clean(store, "run", uploads_older_than_s=0)
    assert sorted(report.aborted_uploads) == sorted(ours)
    left = client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix="mpu/").get("Uploads", [])
    assert sorted(u["Key"] for u in left) == sorted(others)


class _FsyncSpy:
    """Records (path, manifest present?) for every real ``os.fsync`` call (it still runs)."""

    def __init__(self, monkeypatch, manifest_path) -> None:
        self.calls: list[tuple[str, bool]] = []
        real = os.fsync

        def spy(fd):
            self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.exists(manifest_path)))
            return real(fd)
        monkeypatch.setattr(os, "fsync", spy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("fsync", [True, False])
def test_local_commit_reaches_the_disk_before_the_manifest(tmp_path, monkeypatch, fsync):
    root = tmp_path / "ckpt"
    store = open_store(str(root), fsync=fsync)
    spy = _FsyncSpy(monkeypatch, root / "run" / "step-5" / "manifest.json")
    results = _save(store, 5, ranks=2)
    commit(store, "run", 5, results, meta={"step": 5})
    if not fsync:
        assert spy.calls == []
        return
    synced = {path for path, _ in spy.calls}
    before_manifest = {path for path, manifest_there in spy.calls if not manifest_there}
    step_dir = root / "run" / "step-5"
    objects = {str(step_dir / e.name) for r in results for e in r.entries}
    dirs = {str(p) for p in step_dir.rglob("*") if p.is_dir()} | {str(step_dir), str(root / "run")}
    assert objects <= before_manifest, objects - before_manifest
    assert dirs <= before_manifest, dirs - before_manifest
    # the commit records: their temporary file, then (after the move) their directory
    for final in (step_dir / "manifest.json", root / "run" / "latest"):
        assert any(p.startswith(f"{final}.tmp-") for p in synced), final
    assert (str(step_dir), True) in spy.calls and (str(root / "run"), True) in spy.calls
