"""The topology-aware dense all-reduce (``ParallelContext.all_reduce_dense``): the same sum as the
flat one, over 4 gloo ranks laid out on 2 or 3 "nodes", and the byte estimate of its sends."""

from __future__ import annotations

import dataclasses

import numpy as np

from moetrain.parallel.traffic import TrafficCounter
from tests.gloo import run_gloo
from tests.parallel.test_equivalence import tiny_cfg


def _sums(ctx):
    import torch

    from moetrain.parallel.context import node_groups

    out = {}
    for node_R in ((0, 0, 1, 1), (0, 1, 1, 1), (0, 0, 0, 0), (0, 1, 2, 3)):
        nodes = node_groups(node_R, ctx.world_size)
        c = dataclasses.replace(ctx, node_R=node_R, nodes=nodes)
        t = torch.arange(6, dtype=torch.float64) * (ctx.rank + 1) + 0.5 * ctx.rank
        out[node_R] = (nodes is not None, nodes.leader if nodes else None, c.all_reduce_dense(t).tolist())
    return out


def test_node_allreduce_sums_like_the_flat_one_and_groups_only_where_it_helps():
    got = run_gloo(_sums, 4)
    want = [sum(i * (r + 1) + 0.5 * r for r in range(4)) for i in range(6)]  # 10 i + 3
    for rank, out in enumerate(got):
        for node_R, (grouped, leader, total) in out.items():
            np.testing.assert_allclose(total, want, rtol=0, atol=1e-12)
            several = len(set(node_R)) > 1 and len(set(node_R)) < 4
            assert grouped == several, node_R  # one node, or one rank per node: the flat ring
            if grouped:
                assert leader == node_R.index(node_R[rank])  # the first rank of this rank's node


def test_node_allreduce_estimate_counts_what_each_rank_sends():
    """2 nodes x 2 ranks, 1000 bytes: rank 1 sends 1000 to its leader (intra); leader 0 sends its
    ring share of 2 nodes (1000) to leader 2 (inter) and broadcasts 1000 to rank 1 (intra). Over
    the ranks: 2000 inter-node bytes, where the flat ring over 4 ranks crosses with 3000."""
    node_R = (0, 0, 1, 1)
    sent = {}
    for rank in range(4):
        t = TrafficCounter(rank, 4, node_R, 1)
        t.add_node_allreduce("dense_grads", 1000, node_R)
        sent[rank] = t.peer_KC["dense_grads"].tolist()  # [intra, inter]
    assert sent == {0: [1000, 1000], 1: [1000, 0], 2: [1000, 1000], 3: [1000, 0]}
    flat = [TrafficCounter(r, 4, node_R, 1) for r in range(4)]
    for t in flat:
        t.add_ring_allreduce("dense_grads", 1000)
    assert sum(t.peer_KC["dense_grads"][1] for t in flat) == 3000
    assert sum(v[1] for v in sent.values()) == 2000


def _trained(ctx, cache_dir: str, grouped: bool):
    from moetrain.parallel.context import node_groups
    from moetrain.train.trainer import RankTrainer
    from placement.placement import Placement

    node_R = (0, 0, 1, 1)
    c = dataclasses.replace(ctx, node_R=node_R, nodes=node_groups(node_R, 4) if grouped else None)
    t = RankTrainer(tiny_cfg(cache_dir, 4, moe={"dispatch": "hierarchical"}), ctx=c,
                    placement=Placement.random(2, 8, 4, seed=7))
    losses = [t.train_step() for _ in range(3)]
    return [m.loss for m in losses], t.export_tensors("param"), losses[-1].traffic.dense_grads_C.tolist()


def test_training_over_node_groups_equals_the_flat_ring(tmp_path):
    """Three steps on 2 nodes x 2 ranks: the same losses and parameters with the dense gradients
    reduced over the nodes' leaders as with the flat ring (summation order only: 1e-6), and the
    step's own count of dense-gradient bytes crossing nodes drops from 3x to 2x the gradients."""
    cache = str(tmp_path)
    from moetrain.data.training import open_training_data

    c = tiny_cfg(cache, 1)
    open_training_data(c.data, c.train.global_batch_size, c.storage)  # the data cache, before the ranks read it
    flat = run_gloo(_trained, 4, cache, False)
    grouped = run_gloo(_trained, 4, cache, True)
    for (lf, pf, cf), (lg, pg, cg) in zip(flat, grouped):
        np.testing.assert_allclose(lg, lf, rtol=1e-6)
        assert pf.keys() == pg.keys()
        for k in pf:
            np.testing.assert_allclose(pg[k], pf[k], rtol=1e-5, atol=1e-7, err_msg=k)
        assert cg[1] * 3 == cf[1] * 2  # inter-node dense bytes, summed over the ranks
