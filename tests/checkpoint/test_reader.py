"""Resolving, verifying (bad objects named) and loading only what a rank hosts."""

from __future__ import annotations

import dataclasses

import pytest

from moetrain.checkpoint import (
    AsyncCheckpointWriter,
    CorruptObjectError,
    InvalidNameError,
    NotCommittedError,
    ObjectNotFoundError,
    commit,
    load_objects,
    open_root,
    open_store,
    read_manifest,
    resolve,
    verify,
)
from moetrain.checkpoint.cli import ckpt_clean, ckpt_inspect, ckpt_list, ckpt_verify
from moetrain.checkpoint.layout import CheckpointRef
from moetrain.checkpoint.reader import split_uri

from .helpers import assert_same, make_objects


def _commit(store, step, run="run", ranks=2):
    objs, results = {}, []
    for r in range(ranks):
        o = make_objects(rank=r, experts=2, dim=8, seed=step)
        objs.update(o)
        with AsyncCheckpointWriter(store, run, rank=r) as w:
            results.append(w.save(step, o).result())
    commit(store, run, step, results, meta={"step": step, "losses": [3.0, 2.5], "config": {"a": 1}})
    return objs


def _flip_byte(store, key, at=-1):
    data = bytearray(store.read_bytes(key))
    data[at] ^= 0x01
    store.write_bytes(key, bytes(data))


@pytest.mark.parametrize("checksum", ["crc32c", "sha256"])
def test_corrupt_and_missing_objects_are_named(backend, checksum):
    cfg = dataclasses.replace(backend.cfg, checksum=checksum)
    store = open_root(backend.uri, cfg, backend.store_cfg, backoff_s=0.01)
    objs = _commit(store, 2)
    ref = CheckpointRef(store, "run", 2)
    assert read_manifest(ref).checksums == (checksum,)
    _flip_byte(store, ref.key("experts/layer-0/expert-1"))
    store.delete(ref.key("rng/rank-1"))
    report = verify(ref)
    assert not report.ok
    assert report.corrupt == ("experts/layer-0/expert-1",) and report.missing == ("rng/rank-1",)
    assert report.checked == len(objs) - 2
    assert any("expert-1" in p and checksum in p for p in report.problems)
    _, text = ckpt_verify(ref.uri, backend.store_cfg)  # whatever the config says now: the manifest rules
    assert "FAILED" in text and "missing: rng/rank-1" in text and "corrupt: experts/layer-0/expert-1" in text
    assert f"({checksum})" in text
    shallow = verify(ref, deep=False)  # sizes only: the flipped byte goes unnoticed
    assert shallow.missing == ("rng/rank-1",) and shallow.corrupt == ()
    with pytest.raises(CorruptObjectError, match=f"experts/layer-0/expert-1.*{checksum}"):
        load_objects(ref, ["dense/rank-0", "experts/layer-0/expert-1"])
    with pytest.raises(ObjectNotFoundError, match="rng/rank-1"):
        load_objects(ref, ["rng/rank-1"])
    rank0 = load_objects(ref, ["dense/rank-0", "experts/layer-0/expert-0"])  # intact ones load
    assert_same(objs["dense/rank-0"], rank0["dense/rank-0"])


def test_unknown_names_and_uncommitted_checkpoints(store):
    _commit(store, 1)
    ref = CheckpointRef(store, "run", 1)
    with pytest.raises(ObjectNotFoundError, match="experts/layer-7/expert-0"):
        load_objects(ref, ["dense/rank-0", "experts/layer-7/expert-0"])
    with AsyncCheckpointWriter(store, "run") as w:
        w.save(2, make_objects()).result()  # written, never committed
    uncommitted = CheckpointRef(store, "run", 2)
    with pytest.raises(NotCommittedError, match="step-2"):
        read_manifest(uncommitted)
    assert not verify(uncommitted).ok and "manifest" in verify(uncommitted).problems[0]


def test_resolve_forms(store, backend):
    _commit(store, 1)
    _commit(store, 3)
    run_uri = f"{backend.uri}/run"
    assert resolve(run_uri, backend.cfg, store_cfg=backend.store_cfg).step == 3
    assert resolve(f"{run_uri}/latest", backend.cfg, store_cfg=backend.store_cfg).step == 3
    assert resolve(f"{run_uri}/step-1", backend.cfg, store_cfg=backend.store_cfg).step == 1
    assert resolve("latest", backend.cfg, run="run", store_cfg=backend.store_cfg).step == 3
    store.delete("run/latest")  # pointer lost: fall back to the newest manifest
    assert resolve(run_uri, backend.cfg, store_cfg=backend.store_cfg).step == 3
    with pytest.raises(NotCommittedError, match="other"):
        resolve(f"{backend.uri}/other", backend.cfg, store_cfg=backend.store_cfg)


def test_split_uri():
    assert split_uri("s3://b/p/run/step-12") == ("s3://b/p", "run", 12)
    assert split_uri("s3://b/run/latest") == ("s3://b", "run", None)
    assert split_uri("/abs/ckpt/run/") == ("/abs/ckpt", "run", None)
    with pytest.raises(InvalidNameError):
        split_uri("s3://bucket-only")


def test_cli_functions_return_data_and_tables(store, backend):
    _commit(store, 1)
    _commit(store, 2)
    with AsyncCheckpointWriter(store, "run") as w:
        w.save(0, make_objects()).result()  # uncommitted leftover
    infos, table = ckpt_list(backend.uri, backend.store_cfg)
    assert [(i.step, i.committed) for i in infos] == [(0, False), (1, True), (2, True)]
    assert table.splitlines()[0].split()[:4] == ["run", "step", "committed", "size"]
    assert ckpt_list(f"{backend.uri}/run", backend.store_cfg)[0] == infos
    assert [i.step for i in ckpt_list(f"{backend.uri}/run/step-2", backend.store_cfg)[0]] == [2]
    report, text = ckpt_verify(f"{backend.uri}/run", backend.store_cfg)
    assert report.ok and report.step == 2 and "OK - 8 objects" in text
    info, text = ckpt_inspect(f"{backend.uri}/run/step-1", backend.store_cfg)
    assert info["groups"]["experts"]["objects"] == 4 and info["world_size"] == 2
    assert "losses" in text and "[2 items] last=2.5" in text
    cleaned, text = ckpt_clean(f"{backend.uri}/run", backend.store_cfg, keep=1)
    assert (cleaned.kept, cleaned.deleted, cleaned.garbage) == ((2,), (1,), (0,))
    assert [i.step for i in ckpt_list(backend.uri, backend.store_cfg)[0]] == [2]


def test_verify_reports_nonfinite_tensors(tmp_path):
    """Intact bytes, unusable values: `ckpt verify` names the tensors holding NaN or inf."""
    import torch

    from moetrain.checkpoint import AsyncCheckpointWriter, commit, resolve, verify

    store = open_store(str(tmp_path))
    objects = {"good.pt": {"w": torch.ones(3)},
               "bad.pt": {"m": {"exp_avg": torch.tensor([1.0, float("nan")])}, "n": torch.tensor([1, 2])}}
    with AsyncCheckpointWriter(store, "r", async_upload=False) as w:
        result = w.save(1, objects).result()
    commit(store, "r", 1, [result], {"step": 1})
    report = verify(resolve(str(tmp_path / "r" / "step-1")))
    assert not report.ok
    assert report.problems == ("non-finite: bad.pt: NaN or inf in m/exp_avg",)
    assert report.checked == 1  # the finite object
