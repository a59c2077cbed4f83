"""A resume that cannot succeed is refused on the driver before any actor starts (issue #23,
item 7): every object of the step to resume is checked against its manifest (size + checksum),
and the error names the newest older committed step that is intact."""

from __future__ import annotations

import pytest
import torch

from cluster.checkpointing import check_resume
from moetrain.checkpoint import AsyncCheckpointWriter, CheckpointError, CorruptObjectError, commit, open_store
from moetrain.config import from_dict


def _commit(store, step: int) -> None:
    with AsyncCheckpointWriter(store, "r", async_upload=False) as w:
        res = w.save(step, {"dense/rank-0": {"w": torch.full((64,), float(step))},
                            "experts/layer-1/expert-0": {"w": torch.ones(8) * step}}).result()
    commit(store, "r", step, [res], {"step": step})


def _cfg(tmp_path, resume: str):
    return from_dict({"checkpoint": {"uri": str(tmp_path), "resume": resume}, "cluster": {"run_name": "r"}})


def _corrupt(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the checksum can tell
    path.write_bytes(bytes(data))


def test_an_intact_step_passes_and_a_corrupt_one_names_the_newest_intact(tmp_path):
    store = open_store(str(tmp_path))
    for step in (1, 2, 3):
        _commit(store, step)
    check_resume(_cfg(tmp_path, "latest"))  # all intact: nothing raised
    _corrupt(tmp_path / "r" / "step-3" / "experts" / "layer-1" / "expert-0")
    _corrupt(tmp_path / "r" / "step-2" / "dense" / "rank-0")
    with pytest.raises(CorruptObjectError) as err:
        check_resume(_cfg(tmp_path, "latest"))
    msg = str(err.value)
    assert msg.startswith(f"cannot resume from {tmp_path}/r/step-3: corrupt: experts/layer-1/expert-0")
    assert msg.endswith(f"the newest intact committed step is {tmp_path}/r/step-1: resume from it with "
                        f"--resume {tmp_path}/r/step-1")
    check_resume(_cfg(tmp_path, str(tmp_path / "r" / "step-1")))  # the named step passes


def test_a_missing_object_and_no_intact_step(tmp_path):
    store = open_store(str(tmp_path))
    _commit(store, 5)
    (tmp_path / "r" / "step-5" / "dense" / "rank-0").unlink()
    with pytest.raises(CheckpointError, match=r"step-5: missing: dense/rank-0; no older committed step of run 'r' "
                                              r"is intact"):
        check_resume(_cfg(tmp_path, "latest"))


def test_no_resume_no_check(tmp_path):
    check_resume(_cfg(tmp_path, ""))  # nothing to read: the store is not even opened
