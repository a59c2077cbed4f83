"""Failures end loud: a non-finite step stops the run (or is skipped up to a bound) with nothing
non-finite committed; a store that cannot be written is refused before training; checkpoints that
start failing mid-run fail the run; a failed final checkpoint fails the run. Real Ray, a real
S3-protocol server."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from cluster.api import run
from cluster.controller import State
from moetrain.checkpoint import CheckpointError
from moetrain.config import from_dict

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def cfg_for(tmp_path, name: str, *, uri: str = "", steps: int = 6, every: int = 1, train: dict | None = None,
            checkpoint: dict | None = None, storage: dict | None = None):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": steps, "global_batch_size": 8, "warmup_steps": 0, "eval_every": 0, "eval_batches": 1,
                  "log_every": 100, **(train or {})},
        "checkpoint": {"uri": uri, "every": every, "keep": 10, **(checkpoint or {})},
        "storage": dict(storage or {}),
        "cluster": {"num_workers": 2, "run_name": name},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
    })


DIVERGE = {"lr": 1e4, "min_lr": 0.0, "grad_clip": 0.0}  # step 1 is finite, step 2's gradient norm is inf


def _summary(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "out" / name / "summary.json").read_text())


@pytest.mark.parametrize("skips,fail_step", [(0, 2), (2, 4)])
def test_nonfinite_step_stops_the_run_and_nothing_nonfinite_is_committed(tmp_path, ray_local, skips, fail_step):
    store = tmp_path / "store"
    leftover = store / f"nan{skips}" / "step-99" / "dense.pt"  # a crashed earlier attempt's partial upload
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    result = run(cfg_for(tmp_path, f"nan{skips}", uri=str(store), train={**DIVERGE, "max_nonfinite_skips": skips}),
                 raise_on_failure=False)
    assert not leftover.parent.exists(), "uncommitted folders of the run are removed at start"
    steps = sorted(p.name for p in (store / f"nan{skips}").glob("step-*"))
    assert all((store / f"nan{skips}" / s / "manifest.json").exists() for s in steps), steps
    assert result.state == State.FAILED
    assert f"step {fail_step}: non-finite grad_norm=inf" in result.error
    assert [h.step for h in result.history] == list(range(1, fail_step + 1))
    # Checkpoints after skipped steps hold the weights of step 1 (skipped updates change nothing):
    # the last committed one is before the failing step, and `latest` points at it.
    assert (store / f"nan{skips}" / "latest").read_text().strip() == f"step-{fail_step - 1}"
    s = _summary(tmp_path, f"nan{skips}")
    assert (s["state"], s["steps"], s["skipped_steps"]) == ("failed", fail_step, skips + 1)


def test_store_that_cannot_be_written_is_refused_in_seconds(tmp_path, ray_local, s3_server, s3_iam_auth):
    cfg = cfg_for(tmp_path, "denied", uri=s3_server.uri("denied"),
                  checkpoint={"max_retries": 0}, storage={"s3_endpoint": s3_server.endpoint})
    t0 = time.monotonic()
    with s3_iam_auth(), pytest.raises(CheckpointError, match="not writable"):
        run(cfg)
    assert time.monotonic() - t0 < 30


def _enforce_auth(endpoint: str, on: bool) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=5).read()


def test_checkpoints_failing_mid_run_fail_the_run(tmp_path, ray_local, s3_server):
    cfg = cfg_for(tmp_path, "midfail", uri=s3_server.uri("midfail"), steps=12, every=2,
                  checkpoint={"max_retries": 0, "max_consecutive_failures": 2},
                  storage={"s3_endpoint": s3_server.endpoint})

    def revoke_at_step_3(m):
        if m.step == 3:  # once step 2's commit is done (it runs in the background), revoke the credentials
            client, deadline = s3_server.client(), time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    latest = client.get_object(Bucket=s3_server.bucket, Key="midfail/midfail/latest")["Body"].read()
                except client.exceptions.NoSuchKey:
                    latest = b""
                if latest.strip() == b"step-2":
                    break
                time.sleep(0.2)
            time.sleep(2.0)  # retention runs after `latest`
            _enforce_auth(s3_server.endpoint, True)

    try:
        result = run(cfg, on_step=revoke_at_step_3, raise_on_failure=False)
    finally:
        _enforce_auth(s3_server.endpoint, False)
    assert result.state == State.FAILED
    assert "2 checkpoints failed in a row" in result.error
    assert result.history[-1].step < 12
    assert [c.rsplit("/", 1)[-1] for c in result.checkpoints] == ["step-2"]
    s = _summary(tmp_path, "midfail")
    assert s["checkpoints_committed"] == 1 and s["checkpoints_failed"] == 2


def test_failed_final_checkpoint_fails_the_run(tmp_path, ray_local, s3_server):
    cfg = cfg_for(tmp_path, "finalfail", uri=s3_server.uri("finalfail"), steps=3, every=0,
                  checkpoint={"max_retries": 0, "max_consecutive_failures": 0},
                  storage={"s3_endpoint": s3_server.endpoint})
    try:
        result = run(cfg, on_step=lambda m: _enforce_auth(s3_server.endpoint, True), raise_on_failure=False)
    finally:
        _enforce_auth(s3_server.endpoint, False)
    assert result.state == State.FAILED
    assert "final checkpoint (step 3) failed" in result.error
    assert [h.step for h in result.history] == [1, 2, 3]  # training itself completed
    s = _summary(tmp_path, "finalfail")
    assert (s["state"], s["checkpoints_committed"], s["checkpoints_failed"]) == ("failed", 0, 1)
    assert s["val_loss"], "the results of the finished training are still in the summary"


def test_step_watchdog_declares_a_stopped_rank_failed_and_the_run_resumes(tmp_path, ray_local):
    import os
    import signal

    import ray

    from cluster.group import NAMESPACE, actor_name

    cfg = from_dict({**cfg_for(tmp_path, "stuck", uri=str(tmp_path / "store"), steps=8, every=2).to_dict(),
                     "cluster": {"num_workers": 2, "run_name": "stuck", "max_failures": 1, "step_timeout_s": 5}})
    seen = {}

    def stop_rank_1_at_step_3(m):
        if m.step == 3 and "pid" not in seen:
            actor = ray.get_actor(actor_name("stuck", 1), namespace=NAMESPACE)
            seen["pid"] = ray.get(actor.run_fn.remote(lambda trainer: os.getpid()))
            os.kill(seen["pid"], signal.SIGSTOP)  # alive but frozen: only a deadline can notice
            seen["t"] = time.monotonic()
        elif "t" in seen and "resumed_after_s" not in seen:
            seen["resumed_after_s"] = time.monotonic() - seen["t"]

    try:
        result = run(cfg, on_step=stop_rank_1_at_step_3, raise_on_failure=False)
    finally:
        if "pid" in seen:
            try:
                os.kill(seen["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert result.state == State.FINISHED and result.restarts == 1, result.error
    assert [h.step for h in result.history] == [1, 2, 3, 3, 4, 5, 6, 7, 8]  # resumed from step 2's checkpoint
    # noticed within the slowest step + 5 s; the rest is rebuilding the group and resuming
    assert seen["resumed_after_s"] < 60, seen


@pytest.mark.parametrize("signal_at,state", [(2, State.STOPPED), (4, State.FINISHED)])
def test_a_stop_signal_ends_stopped_or_lets_a_finished_run_finish(tmp_path, ray_local, signal_at, state):
    """SIGTERM mid-run: state 'stopped' at that step, final checkpoint committed. SIGTERM at the last
    step (as during the final evaluation / checkpoint): training is complete, the final commit is
    not cut short, and the run is 'finished'."""
    import os
    import signal

    name = f"sig{signal_at}"
    result = run(cfg_for(tmp_path, name, uri=str(tmp_path / "store"), steps=4, every=0),
                 on_step=lambda m: os.kill(os.getpid(), signal.SIGTERM) if m.step == signal_at else None,
                 raise_on_failure=False)
    assert result.state == state, result.error
    assert [c.rsplit("/", 1)[-1] for c in result.checkpoints] == [f"step-{signal_at}"]
    s = _summary(tmp_path, name)
    assert s["state"] == state.value and s["steps"] == signal_at
    assert s["stopped_at_step"] == (signal_at if state == State.STOPPED else None)
