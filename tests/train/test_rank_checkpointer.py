"""The rank checkpointer owned by RankTrainer, in one process on a local store: save -> commit ->
ResumePoint -> a fresh trainer resumes with identical weights, AdamW state, data cursor and step,
and continues exactly like the trainer that never stopped."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from moetrain.checkpoint import CheckpointError, commit, open_store
from moetrain.config import from_dict
from moetrain.train.checkpointer import ResumePoint
from moetrain.train.trainer import RankTrainer


def _cfg(tmp_path, store: str):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 16,
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16, "expert_bias": True}},
        "data": {"seq_len": 16, "vocab_size": 300, "max_bytes_per_domain": 60_000},
        "train": {"steps": 6, "global_batch_size": 4, "eval_every": 0, "warmup_steps": 1},
        "checkpoint": {"uri": store},
        "cluster": {"run_name": "rc"},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path)},
    })


def _save_and_commit(t: RankTrainer, store_uri: str) -> None:
    started = t.checkpointer.save(t.step)
    assert started.error == "" and started.step == t.step
    assert started.cursor == t.cursor.state_dict()
    result = t.checkpointer.result()
    assert result.ok, result
    meta = {"step": t.step, "cursor": started.cursor, "placement": t.placement.to_json(), "world_size": 1,
            "config": t.cfg.to_dict()}
    commit(open_store(store_uri), "rc", t.step, [result], meta)
    return result


def test_save_then_resume_continues_exactly(tmp_path):
    store = str(tmp_path / "store")
    a = RankTrainer(_cfg(tmp_path, store))
    for _ in range(3):
        a.train_step()
    saved = _save_and_commit(a, store)
    steps_a = [a.train_step() for _ in range(3)]
    rest_a = [m.loss for m in steps_a]
    # the uploaded bytes are reported once, in the step after the upload completed
    assert [m.traffic.checkpoint_bytes for m in steps_a] == [saved.bytes_written, 0, 0] and saved.bytes_written > 0
    a.checkpointer.close()

    point = ResumePoint.read(_cfg(tmp_path, store).checkpoint, "latest", run="rc")
    assert (point.step, point.world_size, point.placement) == (3, 1, a.placement)
    b = RankTrainer(_cfg(tmp_path, store))
    b.resume_from(point)
    assert b.step == 3
    rest_b = [b.train_step().loss for _ in range(3)]
    assert rest_b == rest_a  # same weights, AdamW moments, expert bias, cursor and LR step
    pa, pb = a.export_tensors("param"), b.export_tensors("param")
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_save_of_another_step_is_refused(tmp_path):
    t = RankTrainer(_cfg(tmp_path, str(tmp_path / "store")))
    t.train_step()
    with pytest.raises(ValueError, match="trainer is at step 1"):
        t.checkpointer.save(2)


def test_unopenable_store_is_reported_not_raised(tmp_path):
    t = RankTrainer(_cfg(tmp_path, "bogus://nowhere"))
    started = t.checkpointer.save(0)
    assert started.error, started
    assert t.checkpointer.result() == started.error


def test_resume_point_of_an_empty_store_is_an_error(tmp_path):
    with pytest.raises(CheckpointError):
        ResumePoint.read(_cfg(tmp_path, str(tmp_path / "empty")).checkpoint, "latest", run="rc")


def test_a_checkpoint_holding_nan_is_never_streamed(tmp_path):
    from moetrain.train.checkpointer import first_nonfinite

    assert first_nonfinite({"a": {"b": torch.ones(2)}, "c": 3}) == ""
    assert first_nonfinite({"a": {"b": torch.ones(2), "c": torch.tensor([1.0, float("inf")])}}) == "a/c"
    assert first_nonfinite({"n": torch.tensor([1, 2])}) == ""  # integer tensors cannot be NaN
    store = tmp_path / "store"
    t = RankTrainer(_cfg(tmp_path, str(store)))
    t.train_step()
    with torch.no_grad():
        t.moe_layers[0].experts.w_up_SFD[1, 0, 0] = float("nan")
    started = t.checkpointer.save(1)
    assert "NonFiniteCheckpoint" in started.error and "experts/layer-0/expert-1.pt/w_up_SFD" in started.error
    assert t.checkpointer.result() == started.error
    assert not list(store.glob("**/*.pt")), "nothing was written"


def test_resume_into_another_model_names_the_field_and_the_tensor(tmp_path):
    store = str(tmp_path / "store")
    a = RankTrainer(_cfg(tmp_path, store))
    a.train_step()
    _save_and_commit(a, store)
    a.checkpointer.close()
    point = ResumePoint.read(_cfg(tmp_path, store).checkpoint, "latest", run="rc")
    point.check_compatible(_cfg(tmp_path, store))  # the same model: fine
    wider = from_dict({**_cfg(tmp_path, store).to_dict(), "model": {
        **_cfg(tmp_path, store).to_dict()["model"], "dim": 64,
        "moe": {**_cfg(tmp_path, store).to_dict()["model"]["moe"], "expert_ffn_dim": 8}}})
    with pytest.raises(CheckpointError) as exc:
        point.check_compatible(wider)
    assert "model.dim: 32 in the checkpoint, 64 here" in str(exc.value)
    assert "model.moe.expert_ffn_dim: 16 in the checkpoint, 8 here" in str(exc.value)
    narrow = from_dict({**_cfg(tmp_path, store).to_dict(), "model": {
        **_cfg(tmp_path, store).to_dict()["model"],
        "moe": {**_cfg(tmp_path, store).to_dict()["model"]["moe"], "expert_ffn_dim": 8}}})
    with pytest.raises(CheckpointError, match=r"expert-\d\.pt: tensor w_gate_SFD has shape \(16, 32\) in the checkpoint"):
        RankTrainer(narrow).resume_from(point)  # the rank-side check, if the driver's was skipped
