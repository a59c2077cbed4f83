"""Routing statistics window: hand-computed counts per window, the id sample's bound, and the
trainer handing the solver exactly its last ``placement.window`` steps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moetrain.parallel.context import ParallelContext
from moetrain.train.stats import RoutingStatsAccumulator, merge_rank_samples

# Three steps of one micro-batch each, 2 MoE layers, 4 experts, top-2, 2 tokens per step.
STEPS = [
    ([[0, 1], [0, 2]], [[1, 3], [2, 3]]),
    ([[2, 3], [2, 3]], [[0, 1], [0, 1]]),
    ([[1, 2], [0, 3]], [[0, 2], [1, 3]]),
]


def _routing(layers):
    return [SimpleNamespace(topk_ids_TK=torch.tensor(ids)) for ids in layers]


def _feed(acc: RoutingStatsAccumulator, steps=STEPS):
    for layers in steps:
        acc.add(_routing(layers))
        acc.end_step()


def _load_by_hand(steps) -> np.ndarray:
    load = np.zeros((2, 4))
    for layers in steps:
        for l, ids in enumerate(layers):
            for tok in ids:
                for e in tok:
                    load[l, e] += 1
    return load


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_window_counts_are_the_last_window_steps(window):
    acc = RoutingStatsAccumulator(2, 4, 2, window=window, sample_tokens=100)
    _feed(acc)
    stats = acc.window_stats(ParallelContext())
    kept = STEPS[-window:]
    np.testing.assert_array_equal(stats.load_LE, _load_by_hand(kept))
    assert stats.meta["window_steps"] == min(window, 3)
    assert stats.topk_ids_TLK.shape == (2 * len(kept), 2, 2)  # only the window's tokens


def test_window_coactivation_and_transitions_by_hand():
    acc = RoutingStatsAccumulator(2, 4, 2, window=1)
    _feed(acc)
    s = acc.window_stats(ParallelContext())  # step 3 only: layer 0 [1,2],[0,3]; layer 1 [0,2],[1,3]
    coact0 = np.zeros((4, 4))
    coact0[1, 2] = coact0[2, 1] = coact0[0, 3] = coact0[3, 0] = 1
    np.testing.assert_array_equal(s.coact_LEE[0], coact0)
    trans = np.zeros((4, 4))
    for a in (1, 2):
        for b in (0, 2):
            trans[a, b] += 1
    for a in (0, 3):
        for b in (1, 3):
            trans[a, b] += 1
    np.testing.assert_array_equal(s.trans_LEE[0], trans)


def test_sample_keeps_the_most_recent_tokens_up_to_its_bound():
    acc = RoutingStatsAccumulator(2, 4, 2, window=3, sample_tokens=3)
    _feed(acc)
    ids = acc.sample_ids()
    # The last 3 tokens of the window, oldest first: step 2's second token, then step 3's two.
    np.testing.assert_array_equal(ids[:, 0], [[2, 3], [1, 2], [0, 3]])
    np.testing.assert_array_equal(ids[:, 1], [[0, 1], [0, 2], [1, 3]])
    assert RoutingStatsAccumulator(2, 4, 2, window=3, sample_tokens=0).sample_ids().shape == (0, 2, 2)


def test_micro_batches_of_one_step_add_up_and_an_unclosed_step_is_not_in_the_window():
    acc = RoutingStatsAccumulator(2, 4, 2, window=1)
    acc.add(_routing(STEPS[0]))
    acc.add(_routing(STEPS[1]))
    acc.end_step()
    acc.add(_routing(STEPS[2]))  # still open
    np.testing.assert_array_equal(acc.window_stats(ParallelContext()).load_LE, _load_by_hand(STEPS[:2]))


def test_merge_concatenates_rank_samples_and_keeps_reduced_counts():
    a, b = (RoutingStatsAccumulator(2, 4, 2, window=3) for _ in range(2))
    _feed(a, STEPS[:1])
    _feed(b, STEPS[1:2])
    sa, sb = a.window_stats(ParallelContext()), b.window_stats(ParallelContext())
    merged = merge_rank_samples([sa, sb])
    assert merged.topk_ids_TLK.shape[0] == 4
    np.testing.assert_array_equal(merged.topk_ids_TLK[:2], sa.topk_ids_TLK)
    np.testing.assert_array_equal(merged.load_LE, sa.load_LE)


def test_sample_carries_home_ranks_through_merge_and_file(tmp_path):
    from placement.stats import load_routing, save_routing

    a, b = (RoutingStatsAccumulator(2, 4, 2, window=3) for _ in range(2))
    _feed(a, STEPS[:1])
    _feed(b, STEPS[1:3])
    sa, sb = a.window_stats(ParallelContext(rank=0)), b.window_stats(ParallelContext(rank=1))
    assert sa.home_T.tolist() == [0, 0] and sb.home_T.tolist() == [1, 1, 1, 1]
    merged = merge_rank_samples([sa, sb])
    assert merged.home_T.tolist() == [0, 0, 1, 1, 1, 1]
    save_routing(tmp_path / "w.npz", merged)
    back = load_routing(tmp_path / "w.npz")
    assert back.home_T.tolist() == [0, 0, 1, 1, 1, 1]
    np.testing.assert_array_equal(back.topk_ids_TLK, merged.topk_ids_TLK)


def test_sample_carries_steps_through_merge_and_file(tmp_path):
    """Each sampled row knows its optimizer step (the validated selection splits the window by
    steps): a window of 2 over 3 steps keeps steps 1 and 2; sample_tokens=3 drops step 1's first."""
    from placement.stats import load_routing, save_routing

    a = RoutingStatsAccumulator(2, 4, 2, window=2, sample_tokens=3)
    b = RoutingStatsAccumulator(2, 4, 2, window=2)
    _feed(a)
    _feed(b)
    sa, sb = a.window_stats(ParallelContext(rank=0)), b.window_stats(ParallelContext(rank=1))
    assert sa.step_T.tolist() == [1, 2, 2] and sb.step_T.tolist() == [1, 1, 2, 2]
    merged = merge_rank_samples([sa, sb])
    assert merged.step_T.tolist() == [1, 2, 2, 1, 1, 2, 2]
    save_routing(tmp_path / "w.npz", merged)
    assert load_routing(tmp_path / "w.npz").step_T.tolist() == [1, 2, 2, 1, 1, 2, 2]


def test_bad_window_or_sample_size_is_refused():
    with pytest.raises(ValueError, match="window"):
        RoutingStatsAccumulator(2, 4, 2, window=0)
    with pytest.raises(ValueError, match="sample_tokens"):
        RoutingStatsAccumulator(2, 4, 2, sample_tokens=-1)


def _trainer(tmp_path, window: int, sample_tokens: int):
    from moetrain.config import from_dict
    from moetrain.train.trainer import RankTrainer

    cfg = from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 16,
                  "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16}},
        "data": {"seq_len": 16, "vocab_size": 300, "max_bytes_per_domain": 60_000},
        "train": {"steps": 4, "global_batch_size": 4, "eval_every": 0},
        "placement": {"window": window, "sample_tokens": sample_tokens},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path)},
    })
    return RankTrainer(cfg)


@pytest.mark.parametrize("window,sample_tokens", [(1, 10_000), (3, 10_000), (3, 20)])
def test_trainer_hands_the_solver_its_last_window_steps(tmp_path, window, sample_tokens):
    t = _trainer(tmp_path, window, sample_tokens)
    metrics = [t.train_step() for _ in range(4)]
    stats = t.routing_stats()
    want = sum(m.load_LE for m in metrics[-window:])  # each step's own global counts
    np.testing.assert_array_equal(stats.load_LE, want)
    tokens_per_step = 4 * 16
    assert stats.num_tokens == min(sample_tokens, window * tokens_per_step)
