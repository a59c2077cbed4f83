"""DeepSpeed ZeRO 1/2 for the dense parameters (``train.zero_stage``) gives the stage-0 update.

Real gloo processes (``tests/gloo.py``), real DeepSpeed. Each job trains stage 0, 1 and 2 in the
same process group from the same seed, with gradient accumulation, clipping that binds on every
step (so a dense-only clipping norm would show) and a placement with replicated experts; the
losses, gradient norms and parameters after the steps must agree (fp32, 1e-5). The dense AdamW
state each rank holds under ZeRO is measured from the live optimizer and must be 1/N of stage 0's
plus DeepSpeed's alignment padding, computed by hand.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from gloo import run_gloo
from moetrain.config import from_dict
from scripts.helpers import last_json_line

pytestmark = pytest.mark.slow

STEPS = 3
RTOL = 1e-5
CLIP = 0.05  # well below the gradient norm (~1): every step clips, with the global norm


def zero_cfg(cache_dir: str, world: int, stage: int, *, run: str = "z", store: str = "", slots: int = 0,
             steps: int = 2 * STEPS):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 16,
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16, "num_shared_experts": 1,
                          "expert_bias": True}},
        "data": {"seq_len": 16, "vocab_size": 300, "max_bytes_per_domain": 60_000, "cache_dir": cache_dir},
        "train": {"steps": steps, "global_batch_size": 8, "grad_accum_steps": 2, "eval_every": 0,
                  "warmup_steps": 1, "grad_clip": CLIP, "zero_stage": stage},
        "checkpoint": {"uri": store},
        "cluster": {"num_workers": world, "run_name": run},
        "placement": {"slots_per_rank": slots},
        "logging": {"wandb": "disabled"},
    })


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zero-data"))


def dense_state_bytes_stage0(t) -> int:
    dense = {id(p) for p in t.dense_params}
    return sum(v.numel() * v.element_size() for p, st in t.optimizer.state.items() if id(p) in dense
               for k, v in st.items() if k != "step")


def _three_stages(ctx, cache_dir: str, slots: int) -> dict:
    from moetrain.train.trainer import RankTrainer

    out = {}
    for stage in (0, 1, 2):
        t = RankTrainer(zero_cfg(cache_dir, ctx.world_size, stage, slots=slots), ctx=ctx)
        metrics = [t.train_step() for _ in range(STEPS)]
        out[stage] = {"loss": [m.loss for m in metrics], "norm": [m.grad_norm for m in metrics],
                      "params": t.export_tensors("param"),
                      "dense_bytes": dense_state_bytes_stage0(t) if stage == 0 else t.dense_zero.state_bytes(),
                      "dense_numel": [sum(p.numel() for p in t.dense_params if p.ndim >= 2),
                                      sum(p.numel() for p in t.dense_params if p.ndim < 2)]}
    return out


def _check_same_update(res: dict) -> None:
    ref = res[0]
    assert min(ref["norm"]) > 10 * CLIP  # clipping binds on every step
    for stage in (1, 2):
        got = res[stage]
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=RTOL)
        np.testing.assert_allclose(got["norm"], ref["norm"], rtol=RTOL)
        assert got["params"].keys() == ref["params"].keys()
        worst = max(rel_err(got["params"][k], ref["params"][k]) for k in ref["params"])
        assert worst < RTOL, f"stage {stage}: parameters differ by {worst:.2e}"


def expected_zero_bytes(numel_per_group: list[int], world: int) -> int:
    """DeepSpeed pads each group's flat buffer to a multiple of 2 x world elements, splits it in
    equal slices, and AdamW keeps two fp32 moments per element of a slice."""
    align = 2 * world
    return sum(2 * 4 * (math.ceil(n / align) * align // world) for n in numel_per_group if n)


@pytest.mark.parametrize("world,slots", [(2, 3), (4, 2)])
def test_zero_1_and_2_equal_stage_0_and_shard_the_dense_state(cache_dir, world, slots):
    """``slots`` > experts / world: some experts get replicas, reduced by moetrain, not DeepSpeed."""
    ranks = run_gloo(_three_stages, world, cache_dir, slots)
    for res in ranks:
        _check_same_update(res)
    assert all(r[1]["loss"] == ranks[0][1]["loss"] for r in ranks)
    full = ranks[0][0]["dense_bytes"]  # stage 0: every rank holds the whole dense AdamW state
    assert full == 2 * 4 * sum(ranks[0][0]["dense_numel"])
    for res in ranks:
        for stage in (1, 2):
            got = res[stage]["dense_bytes"]
            assert got == expected_zero_bytes(res[0]["dense_numel"], world)
            assert got <= full / world * 1.05


SINGLE = """
import json, sys
from moetrain.train.trainer import RankTrainer
sys.path.insert(0, {tests!r})
from train.test_zero import zero_cfg
out = {{}}
for stage in (0, 1, 2):
    t = RankTrainer(zero_cfg({cache!r}, 1, stage))
    out[stage] = [t.train_step().loss for _ in range({steps})]
    out[f"p{{stage}}"] = float(sum(abs(v).sum() for v in t.export_tensors("param").values()))
print(json.dumps(out))
"""


def test_zero_on_one_process_without_a_process_group(cache_dir):
    """One rank, no torch.distributed yet (a 1-actor run): ZeRO starts a one-rank gloo group."""
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1])
    code = SINGLE.format(tests=tests, cache=cache_dir, steps=STEPS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json_line(proc.stdout)
    for stage in ("1", "2"):
        np.testing.assert_allclose(out[stage], out["0"], rtol=RTOL)
        assert abs(out[f"p{stage}"] - out["p0"]) <= RTOL * out["p0"]


def _nonfinite(ctx, cache_dir: str) -> dict:
    from moetrain.train.trainer import RankTrainer

    cfg = zero_cfg(cache_dir, ctx.world_size, 1)
    t = RankTrainer(cfg, ctx=ctx)
    t.train_step()
    before = t.export_tensors("param")
    state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in t.dense_zero.gather_state().items()}
    with torch.no_grad():  # poison one expert weight on rank 0 only: its gradient, the norm, the loss
        if ctx.rank == 0:
            t.moe_layers[0].experts.w_up_SFD[0].fill_(float("nan"))
    m = t.train_step()
    after = t.export_tensors("param")
    dense_same = all(np.array_equal(before[k], after[k]) for k in before if k.startswith("dense/"))
    state_same = all(v.equal(t.dense_zero.gather_state()[k][kk]) for k, d in state.items() for kk, v in d.items())
    return {"skipped": m.skipped, "nonfinite": m.nonfinite, "dense_same": dense_same, "state_same": state_same}


def test_a_nonfinite_step_skips_the_dense_update_on_every_rank(cache_dir):
    """A NaN on one rank's expert makes every rank skip: DeepSpeed's dense slices and their AdamW
    state stay exactly as they were."""
    for res in run_gloo(_nonfinite, 2, cache_dir):
        assert res["skipped"] and "lm_loss" in res["nonfinite"] and "grad_norm" in res["nonfinite"]
        assert res["dense_same"] and res["state_same"]


def test_stage_3_is_refused_before_training_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--set", "train.zero_stage=3",
                           "--set", f"logging.out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.zero_stage (3)" in lines[0], proc.stderr
