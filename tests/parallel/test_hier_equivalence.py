"""Training with hierarchical dispatch equals flat dispatch and the single-process model.

4 real gloo processes run :class:`RankTrainer` with a rank -> node map in their
``ParallelContext`` (2 nodes x 2 ranks, and uneven 1 + 3), 4 AdamW steps each, against one process
on the same global batches (tests/parallel/test_equivalence.py explains the oracle and the
capacity rule): per-step losses, the last step's gradients and the parameters after the steps,
expert by expert. Cases: random placement + shared experts (hierarchical and flat), replicated
experts on 1 + 3 nodes, uneven slots with capacity dropping, node-limited routing (the
one-process reference is given the same expert -> node map). The step metrics carry the bytes
sent: hierarchical sends fewer expert all-to-all bytes between nodes than flat on the same run.

One spawn runs every case (CI time)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.gloo import run_gloo
from tests.parallel.test_equivalence import assert_same_run, tiny_cfg

STEPS = 4
WORLD = 4
SHARED = {"num_shared_experts": 1}


def _placement(kind: str):
    from placement.placement import Placement

    if kind == "random":
        return Placement.random(2, 8, WORLD, seed=7)
    if kind == "replicated":  # 12 slots for 8 experts: 4 experts have two replicas
        return Placement.random(2, 8, WORLD, seed=5, slots_per_rank=3)
    if kind == "uneven":
        return Placement.random(2, 8, WORLD, seed=3, slots_per_rank=[1, 3, 2, 2])
    return Placement.contiguous(2, 8, WORLD)


# (name, placement kind, node map, model.moe settings, LBL scope)
CASES = [
    ("shared-hier", "random", (0, 0, 1, 1), {**SHARED, "dispatch": "hierarchical"}, "global"),
    ("shared-flat", "random", (0, 0, 1, 1), {**SHARED, "dispatch": "flat"}, "global"),
    ("replicated-1+3", "replicated", (0, 1, 1, 1), {"dispatch": "hierarchical"}, "global"),
    ("uneven-capacity", "uneven", (0, 0, 1, 1), {"dispatch": "hierarchical", "capacity_factor": 1.0}, "micro"),
    ("node-limited", "contiguous", (0, 0, 1, 1), {"dispatch": "hierarchical", "max_nodes_per_token": 1}, "global"),
]


def _cfg(cache_dir: str, moe: dict, scope: str):
    cfg = tiny_cfg(cache_dir, WORLD, moe=moe, lbl_scope=scope)
    d = cfg.to_dict()
    from moetrain.config import from_dict
    return from_dict({**d, "train": {**d["train"], "steps": STEPS}})


def _train(trainer):
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return [m.loss for m in metrics], trainer.export_tensors("grad"), trainer.export_tensors("param"), metrics


def _ep_runs(ctx, cache_dir: str):
    from moetrain.train.trainer import RankTrainer

    out = {}
    for name, kind, node_R, moe, scope in CASES:
        placement = _placement(kind)
        cfg = _cfg(cache_dir, moe, scope)
        t = RankTrainer(cfg, ctx=dataclasses.replace(ctx, node_R=node_R), placement=placement)
        losses, g, p, metrics = _train(t)
        out[name] = (losses, g, p, [m.traffic for m in metrics], type(t.moe_layers[0].dispatcher).__name__)
        if name == "shared-hier":  # a re-placement: its bytes are in the next step's traffic
            report = t.migrate(_placement("contiguous"))
            out["migration"] = (report.bytes_sent_R, t.train_step().traffic.migration_C.tolist(),
                                t.train_step().traffic.migration_C.tolist())
    return out


def _reference(cache_dir: str, name: str, kind: str, node_R, moe: dict, scope: str):
    from moetrain.config import from_dict
    from moetrain.parallel.hierarchical import expert_nodes
    from moetrain.train.trainer import RankTrainer

    d = _cfg(cache_dir, moe, scope).to_dict()
    A = d["train"]["grad_accum_steps"] * (WORLD if moe.get("capacity_factor") else 1)  # one rank's tokens each
    single = from_dict({**d, "train": {**d["train"], "grad_accum_steps": A},
                        "cluster": {**d["cluster"], "num_workers": 1}, "placement": {"slots_per_rank": 0}})
    t = RankTrainer(single)
    for idx, layer in enumerate(t.moe_layers):  # the multi-node run's expert -> node map
        layer.router.set_expert_nodes(expert_nodes(_placement(kind), idx, node_R))
    losses, g, p, metrics = _train(t)
    assert all(m.traffic.inter_bytes == 0 and m.traffic.intra_bytes == 0 for m in metrics)
    return losses, g, p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("data-cache"))
    refs = {c[0]: _reference(cache_dir, *c) for c in CASES}  # also builds the data cache the ranks read
    return refs, run_gloo(_ep_runs, WORLD, cache_dir)


@pytest.mark.slow
def test_hierarchical_and_flat_training_equal_one_process(runs):
    refs, ranks = runs
    for name, *_ in CASES:
        losses, grads, params = ranks[0][name][0], {}, {}
        for r in ranks:
            assert r[name][0] == losses, f"{name}: ranks report different losses"
            grads.update(r[name][1])
            params.update(r[name][2])
        want = "AllToAllDispatcher" if name.endswith("flat") else "HierarchicalDispatcher"
        assert ranks[0][name][4] == want, f"{name}: ran {ranks[0][name][4]}"
        try:
            assert_same_run(losses, grads, params, *refs[name])
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


@pytest.mark.slow
def test_node_limited_routing_changes_the_run(runs):
    """The limit binds: the node-limited run differs from the same run without it (contiguous
    placement, 8 experts over 2 nodes, top-2: many tokens would pick experts on both nodes)."""
    refs, _ = runs
    assert np.abs(np.subtract(refs["node-limited"][0], refs["shared-hier"][0])).max() > 1e-4


@pytest.mark.slow
def test_step_traffic_is_the_same_on_every_rank_and_hierarchical_crosses_less(runs):
    _, ranks = runs
    for name, *_ in CASES:
        for r in ranks[1:]:
            for a, b in zip(r[name][3], ranks[0][name][3]):
                assert a.to_dict() == b.to_dict(), f"{name}: ranks report different traffic"
    hier, flat = ranks[0]["shared-hier"][3], ranks[0]["shared-flat"][3]
    hier_inter = sum(t.a2a_LPC[..., 1].sum() for t in hier)
    flat_inter = sum(t.a2a_LPC[..., 1].sum() for t in flat)
    assert 0 < hier_inter < flat_inter, f"inter-node a2a bytes: hierarchical {hier_inter}, flat {flat_inter}"
    for t in hier:  # 2 MoE layers, forward and backward both counted; dense all-reduce crosses nodes
        assert (t.a2a_LPC > 0).all() and t.dense_grads_C[1] > 0 and t.expert_grads_C.sum() == 0
    assert all(t.expert_grads_C[1] > 0 for t in ranks[0]["replicated-1+3"][3]), "replicas reduce over nodes"


@pytest.mark.slow
def test_migration_bytes_appear_once_split_by_node(runs):
    """Random -> contiguous placement on 2 x 2: what each rank sent, by destination, summed by
    link class, is the next step's ``migration_C`` (and the step after reports none)."""
    _, ranks = runs
    node_R = (0, 0, 1, 1)
    want = [0, 0]
    for rank, r in enumerate(ranks):
        for dst, n in enumerate(r["migration"][0]):
            if dst != rank:
                want[int(node_R[dst] != node_R[rank])] += n
    assert want[1] > 0 and ranks[0]["migration"][1] == want and ranks[0]["migration"][2] == [0, 0]
