"""data.rank_assignment=domain on real Ray actors: only which rank gets which row changes.

Two ranks with gradient accumulation train the same global batches as one process: with
``domain`` assignment, every rank's slice is domain-sorted (rank 0 mostly ``code``, rank 1 mostly
``english``), yet the per-step losses and the final gradients equal the single-process run's
(shuffled) to 1e-5, because each micro-batch keeps exactly its rows. The off-rank sends differ
from the ``shuffled`` run's: the tokens really sit on other ranks.
"""

from __future__ import annotations

import numpy as np
import pytest

from moetrain.config import from_dict
from moetrain.data import shard_global_batch
from moetrain.data.assign import assign_rows, domain_rank_map
from moetrain.data.training import open_training_data
from moetrain.train.trainer import RankTrainer
from placement.placement import Placement

STEPS = 4
RTOL = 1e-5


def cfg_for(cache_dir: str, num_workers: int, assignment: str):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000, "cache_dir": cache_dir,
                 "rank_assignment": assignment},
        "train": {"steps": STEPS, "global_batch_size": 16, "grad_accum_steps": 2, "warmup_steps": 1,
                  "eval_every": 0, "loss": {"lbl_scope": "global"}},
        "cluster": {"num_workers": num_workers, "run_name": f"ra{num_workers}", "cpus_per_worker": 1},
        "logging": {"wandb": "disabled"},
    })


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def run_group(cfg):
    from cluster.group import WorkerGroup

    group = WorkerGroup.create(cfg, Placement.contiguous(2, 4, cfg.cluster.num_workers))
    try:
        metrics = [group.call("train_step")[0] for _ in range(STEPS)]
        grads = {}
        for g in group.call("export_tensors", "grad"):
            grads.update(g)
    finally:
        group.shutdown()
    return [m.loss for m in metrics], [m.offrank_sends for m in metrics], grads


def test_domain_slices_are_homogeneous(tmp_path):
    cfg = cfg_for(str(tmp_path), 2, "domain")
    data = open_training_data(cfg.data, 16)
    dmap = domain_rank_map(tuple(data.domains), data.shares_D, 2)
    pure = {"shuffled": [], "domain": []}
    for _ in range(20):
        dom_B, _ = data.cursor.next_batch()
        for kind, d in (("shuffled", dom_B), ("domain", dom_B[assign_rows(dom_B, 2, 2, dmap)])):
            for r in range(2):
                for mb in shard_global_batch(d, 2, 2, r):  # share of the rank's majority domain
                    pure[kind].append(np.bincount(mb, minlength=2).max() / len(mb))
    # The mixture sampler puts 8 or 9 code rows in every global batch of 16 (code ~55% of the
    # rows); the step's shuffle splits them over the 2 micro-batches at random, and sorting keeps
    # each micro-batch's rows, so a rank slice is pure unless that split is uneven.
    print({k: round(float(np.mean(v)), 3) for k, v in pure.items()})
    assert np.mean(pure["domain"]) >= 0.85 and np.mean(pure["shuffled"]) <= 0.75
    dom_B, _ = data.cursor.next_batch()  # one micro-batch: the exact mixture, at most one spilled row
    for r in range(2):
        (mb,) = shard_global_batch(dom_B[assign_rows(dom_B, 1, 2, dmap)], 1, 2, r)
        assert np.bincount(mb, minlength=2).max() >= 7


@pytest.mark.ray
@pytest.mark.slow
def test_domain_assignment_equals_single_process(ray_local, tmp_path):
    cache = str(tmp_path)
    single = RankTrainer(cfg_for(cache, 1, "shuffled"))
    ref_losses = [single.train_step().loss for _ in range(STEPS)]
    ref_grads = single.export_tensors("grad")
    dom_losses, dom_sends, dom_grads = run_group(cfg_for(cache, 2, "domain"))
    shuf_losses, shuf_sends, _ = run_group(cfg_for(cache, 2, "shuffled"))
    for got in (dom_losses, shuf_losses):
        assert rel_err(np.array(got), np.array(ref_losses)) < RTOL
    assert set(dom_grads) == set(ref_grads)
    worst = max(rel_err(dom_grads[k], ref_grads[k]) for k in ref_grads)
    assert worst < RTOL, worst
    assert dom_sends != shuf_sends  # the rows really moved between ranks
