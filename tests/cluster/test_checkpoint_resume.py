"""Checkpoint -> resume through the real controller and worker group.

Bit-exact continuation on the same actors; continuation within the equivalence tolerance on 4 -> 2
and 2 -> 4 actors and onto another placement; the same on real S3- and GCS-protocol servers, with
the prepared data read from the same server."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.api import run
from moetrain.config import StoreConfig, from_dict
from moetrain.data.training import prepare_local
from moetrain.storage import open_store
from placement.placement import Placement

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def cfg_for(tmp_path, uri: str, name: str, workers: int, *, steps: int = 8, every: int = 4, resume: str = "",
            extra: dict | None = None):
    d = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32, "expert_bias": True}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": steps, "global_batch_size": 8, "grad_accum_steps": 2, "warmup_steps": 2,
                  "eval_every": 0, "log_every": 100},
        "checkpoint": {"uri": uri, "every": every, "keep": 5, "resume": resume},
        "cluster": {"num_workers": workers, "run_name": name},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
    }
    for section, values in (extra or {}).items():
        d.setdefault(section, {}).update(values)
    return from_dict(d)


def losses(result, from_step: int) -> np.ndarray:
    return np.array([h.loss for h in result.history if h.step > from_step])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ray_local):
    """An uninterrupted 4-actor run with checkpoints at steps 4 and 8."""
    tmp = tmp_path_factory.mktemp("ckpt")
    uri = str(tmp / "store")
    result = run(cfg_for(tmp, uri, "base", 4))
    assert [c.rsplit("/", 1)[-1] for c in result.checkpoints] == ["step-4", "step-8"]
    return tmp, uri, result


def test_resume_same_actors_is_bit_exact(baseline):
    tmp, uri, base = baseline
    resumed = run(cfg_for(tmp, uri, "same", 4, resume=f"{uri}/base/step-4"))
    assert [h.step for h in resumed.history] == [5, 6, 7, 8]
    assert np.array_equal(losses(resumed, 4), losses(base, 4)), (losses(resumed, 4), losses(base, 4))


def test_resume_4_to_2_then_2_to_4_actors(baseline):
    tmp, uri, base = baseline
    two = run(cfg_for(tmp, uri, "two", 2, every=2, resume=f"{uri}/base/step-4"))
    np.testing.assert_allclose(losses(two, 4), losses(base, 4), rtol=1e-5)
    four = run(cfg_for(tmp, uri, "four", 4, resume=f"{uri}/two/step-6"))
    np.testing.assert_allclose(losses(four, 6), losses(base, 6), rtol=1e-5)


def test_resume_onto_another_placement(baseline, tmp_path):
    tmp, uri, base = baseline
    path = tmp_path / "placement.json"
    path.write_text(Placement.random(2, 8, 4, seed=9).to_json())
    moved = run(cfg_for(tmp, uri, "moved", 4, resume=f"{uri}/base/step-4", extra={"placement": {"initial": str(path)}}))
    np.testing.assert_allclose(losses(moved, 4), losses(base, 4), rtol=1e-5)


@pytest.mark.parametrize("kind", [pytest.param("s3", marks=pytest.mark.s3),
                                  pytest.param("gcs", marks=pytest.mark.gcs)])
def test_checkpoint_and_bit_exact_resume_on_object_store(tmp_path, ray_local, request, kind):
    """Prepared data and checkpoints on the same server, both reached through the one
    storage.<kind>_endpoint field (the driver and every rank stream the data from there)."""
    server = request.getfixturevalue(f"{kind}_server")
    uri = server.uri("runs")
    store_cfg = StoreConfig(**{f"{kind}_endpoint": server.endpoint})
    prepared = prepare_local(cfg_for(tmp_path, uri, "any", 2).data)  # the builtin corpus, prepared locally
    data = open_store(server.uri(f"data-{kind}"), store_cfg)
    for f in sorted(p for p in prepared.rglob("*") if p.is_file()):
        data.write_bytes(str(f.relative_to(prepared)), f.read_bytes())
    extra = {"storage": {f"{kind}_endpoint": server.endpoint},
             "data": {"source": "prepared", "prepared_uri": data.uri}}
    base = run(cfg_for(tmp_path, uri, f"{kind}base", 2, extra=extra))
    assert len(base.checkpoints) == 2 and all(c.startswith(uri) for c in base.checkpoints)
    resumed = run(cfg_for(tmp_path, uri, f"{kind}resumed", 2, resume=f"{uri}/{kind}base/step-4", extra=extra))
    assert np.array_equal(losses(resumed, 4), losses(base, 4))


def test_unreachable_store_is_refused_before_training(tmp_path, ray_local):
    import time

    from moetrain.checkpoint import CheckpointError
    from tests.ports import free_port

    port = free_port()  # a port nobody listens on
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="s3://nowhere/runs"):
        run(cfg_for(tmp_path, "s3://nowhere/runs", "unreachable", 2, steps=6, every=2,
                    extra={"checkpoint": {"max_retries": 0}, "storage": {"s3_endpoint": f"http://127.0.0.1:{port}"}}))
    assert time.monotonic() - t0 < 30
