"""One routing path per micro-batch: the per-expert counts computed once (``losses.routing_counts``)
serve the load balancer and the statistics with the values each computed alone, and the
statistics keep a bounded id sample on the device that equals the window's newest tokens."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from moetrain import losses
from moetrain.config import LossConfig, MoEConfig
from moetrain.parallel.context import ParallelContext
from moetrain.train.balance import LoadBalancer
from moetrain.train.stats import RoutingStatsAccumulator

L, E, K = 2, 6, 2


def _routing(g: torch.Generator, T: int):
    out = []
    for _ in range(L):
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        logits = torch.randn(T, E, generator=g)
        out.append(SimpleNamespace(topk_ids_TK=ids, logits_TE=logits, scores_TE=logits.softmax(-1)))
    return out


def test_routing_counts_by_hand():
    ids = torch.tensor([[0, 2], [2, 3], [2, 0]])
    assert losses.routing_counts([ids, ids[:1]], 4).tolist() == [[2, 0, 3, 1], [1, 0, 1, 0]]
    assert losses.expert_counts(ids, 4).dtype == torch.float32


def test_statistics_with_shared_counts_equal_their_own_and_keep_only_the_newest_ids():
    g = torch.Generator().manual_seed(3)
    window, sample, micro = 3, 10, 4
    own, shared = (RoutingStatsAccumulator(L, E, K, window=window, sample_tokens=sample) for _ in range(2))
    steps_ids = []
    for step in range(7):
        step_ids = []
        for _ in range(3):  # micro-batches of 4 tokens: 12 per step
            routing = _routing(g, micro)
            counts_LE = losses.routing_counts([r.topk_ids_TK for r in routing], E)
            before = counts_LE.clone()
            own.add(routing)
            shared.add(routing, counts_LE)
            assert torch.equal(counts_LE, before), "the shared counts must not be modified"
            step_ids.append(torch.stack([r.topk_ids_TK for r in routing], 1).numpy())
            kept = sum(i.shape[0] for s in [*shared._steps, shared._current] if s for i in s.ids)
            assert kept <= 2 * sample + micro, f"{kept} token ids kept on the device"
        own.end_step()
        shared.end_step()
        steps_ids.append(np.concatenate(step_ids))
    for a, b in zip(own.local(), shared.local()):
        assert torch.equal(a, b)
    newest = np.concatenate(steps_ids[-window:])[-sample:]
    assert np.array_equal(shared.sample_ids(), newest.astype(np.int16))
    assert np.array_equal(own.sample_ids(), newest.astype(np.int16))
    load = np.zeros((L, E))
    for ids in steps_ids[-window:]:
        for layer in range(L):
            np.add.at(load[layer], ids[:, layer].ravel(), 1)
    assert np.array_equal(shared.local()[0].numpy(), load)


def test_balancer_with_shared_counts_equals_its_own():
    g = torch.Generator().manual_seed(5)
    moe = MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=8)
    for scope in ("micro", "global", "sequence"):
        cfg = LossConfig(lbl_coeff=0.01, lbl_scope=scope, z_loss_coeff=1e-3)
        own, shared = (LoadBalancer(cfg, moe, L, ParallelContext()) for _ in range(2))
        for _ in range(2):
            routing = _routing(g, 8)
            counts_LE = losses.routing_counts([r.topk_ids_TK for r in routing], E)
            a = own.micro_losses(routing, batch_size=2)
            b = shared.micro_losses(routing, batch_size=2, counts_LE=counts_LE)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), scope
        assert torch.equal(own.global_step_counts(), shared.global_step_counts())
        assert torch.equal(shared.local_counts_LE, shared.global_step_counts())  # one rank: local = global
