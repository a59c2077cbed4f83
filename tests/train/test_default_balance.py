"""The shipped default run (``moetrain train``: the ``tiny`` config) keeps every expert busy.

One process runs the whole default run in-process (``RankTrainer``; an expert-parallel run
computes the same model). Every expert of every MoE layer must receive at least 1 / (4 E) of
the layer's routed (token, k) pairs over the whole run and over its last third — where a
collapsing expert shows first. With the old convention (LBL averaged over the 2 MoE layers at
0.01, i.e. 0.005 per layer) layer 0's least-used expert got 2.2% of the last 50 steps here
(0.2% with 2 threads; the floor is 1 / 32 = 3.1%); with 0.02 per layer, summed over layers, the
worst expert kept >= 6.6% of the last 50 steps in each of 5 seeds (docs/load_balancing.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrain.config import load_config
from moetrain.train.trainer import RankTrainer


@pytest.fixture
def one_thread():
    """One intra-op thread: the run is then bit-reproducible on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_default_run_has_no_dead_experts(one_thread):
    # The default runs on 2 actors; one process is the same model on the same global batches.
    cfg = load_config(None, ["logging.wandb=disabled", "cluster.num_workers=1"])
    E = cfg.model.moe.num_experts
    trainer = RankTrainer(cfg)
    load_SLE = np.stack([trainer.train_step().load_LE for _ in range(cfg.train.steps)])
    floor = 1.0 / (4 * E)
    for name, part_SLE in [("whole run", load_SLE), ("last third", load_SLE[-(len(load_SLE) // 3):])]:
        share_LE = part_SLE.sum(0) / part_SLE.sum(axis=(0, 2))[:, None]
        worst = np.unravel_index(share_LE.argmin(), share_LE.shape)
        assert share_LE.min() >= floor, (
            f"{name}: layer {worst[0]} expert {worst[1]} got {share_LE.min():.2%} of the routed pairs "
            f"(floor 1/(4E) = {floor:.2%}); shares per layer: {np.round(share_LE, 3).tolist()}")
