"""Checkpoints with ZeRO: ``dense.pt`` keeps the stage-0 layout, so any stage and world size
resumes from any checkpoint with the dense AdamW state resharded.

Real gloo processes, a real local store, real commits. One chain of runs of the same model:
a: 2 ranks, ZeRO-1: 3 steps, checkpoint, 3 more steps (the reference trajectory);
b: 4 ranks, ZeRO-2, resumes a's checkpoint (2 -> 4), writes its own at the same step, trains on;
c: 2 ranks, ZeRO-1, resumes b's (4 -> 2): after 2 -> 4 -> 2, bit-exactly run a's last 3 steps;
d: 2 ranks, stage 0, resumes b's (ZeRO -> stage 0), writes its own at the same step;
e: 4 ranks, ZeRO-1, resumes d's (stage 0 -> ZeRO).
Each resume must hold exactly the dense AdamW state a saved (gathered from the live slices).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist

from gloo import run_gloo
from train.test_zero import STEPS, RTOL, rel_err, zero_cfg

pytestmark = pytest.mark.slow


def dense_state(t) -> dict[str, np.ndarray]:
    """Every dense parameter's AdamW state by name (collective under ZeRO)."""
    if t.dense_zero is not None:
        state = t.dense_zero.gather_state()
    else:
        names = {id(p): n for n, p in t.model.dense_parameters()}
        state = {names[id(p)]: st for p, st in t.optimizer.state.items() if id(p) in names}
    return {f"{n}/{k}": v.numpy().copy() for n, st in state.items() for k, v in st.items()}


def _save_commit(t, store: str, run: str) -> None:
    from moetrain.checkpoint import commit, open_store

    started = t.checkpointer.save(t.step)
    result = t.checkpointer.result()
    assert started.error == "" and result.ok, (started, result)
    results = [None] * t.ctx.world_size
    dist.all_gather_object(results, result)
    if t.ctx.rank == 0:
        meta = {"step": t.step, "cursor": started.cursor, "placement": t.placement.to_json(),
                "world_size": t.ctx.world_size, "config": t.cfg.to_dict()}
        commit(open_store(store), run, t.step, results, meta)
    dist.barrier()


def _job(ctx, cache: str, store: str, stage: int, resume: str, save_as: str) -> dict:
    from moetrain.train.checkpointer import ResumePoint
    from moetrain.train.trainer import RankTrainer

    cfg = zero_cfg(cache, ctx.world_size, stage, run=save_as or "x", store=store)
    t = RankTrainer(cfg, ctx=ctx)
    out = {}
    if resume:
        t.resume_from(ResumePoint.read(cfg.checkpoint, "latest", run=resume))
        out["loaded"] = dense_state(t)
    else:
        for _ in range(STEPS):
            t.train_step()
    if save_as:
        _save_commit(t, store, save_as)
        out.setdefault("loaded", dense_state(t))
    out["loss"] = [t.train_step().loss for _ in range(STEPS)]
    out["params"] = t.export_tensors("param")
    t.checkpointer.close()
    return out


def _merged(ranks: list[dict]) -> dict:
    """Rank 0's result with the parameters of every rank (each exports its primary experts)."""
    params = {k: v for r in ranks for k, v in r["params"].items()}
    return {**ranks[0], "params": params}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_zero_checkpoints_reshard_across_world_sizes_and_stages(tmp_path):
    cache, store = str(tmp_path / "cache"), str(tmp_path / "store")
    a = _merged(run_gloo(_job, 2, cache, store, 1, "", "a"))
    b = _merged(run_gloo(_job, 4, cache, store, 2, "a", "b"))
    c = _merged(run_gloo(_job, 2, cache, store, 1, "b", ""))
    d = _merged(run_gloo(_job, 2, cache, store, 0, "b", "d"))
    e = _merged(run_gloo(_job, 4, cache, store, 1, "d", ""))
    saved = a["loaded"]
    assert saved and all(np.isfinite(v).all() for v in saved.values())
    for name, got in (("2->4", b), ("4->2", c), ("ZeRO->0", d), ("0->ZeRO", e)):
        assert _same(got["loaded"], saved), f"{name}: the dense AdamW state changed on resume"
    assert c["loss"] == a["loss"]  # 2 -> 4 -> 2 only copies: bit-exact
    assert _same(c["params"], a["params"])
    for name, got in (("2->4", b), ("ZeRO->0", d), ("0->ZeRO", e)):
        np.testing.assert_allclose(got["loss"], a["loss"], rtol=RTOL, err_msg=name)
        worst = max(rel_err(got["params"][k], a["params"][k]) for k in a["params"])
        assert worst < RTOL, f"{name}: parameters differ by {worst:.2e}"
