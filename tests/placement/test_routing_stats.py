"""Routing statistics: counting, the one loader, save / load round trip, split, validation."""

import json

import numpy as np
import pytest

from placement.stats import (RoutingStats, StatsError, from_aggregates, from_topk_ids, load_routing,
                             split_tokens)


def _ids():
    # 3 tokens, 2 layers, k=2, 4 experts; token 2 misses layer 1
    return np.array([[[0, 1], [2, 3]],
                     [[0, 2], [2, 1]],
                     [[1, 0], [-1, -1]]], dtype=np.int16)


def test_counts_by_hand():
    s = from_topk_ids(_ids(), 4)
    assert s.load_LE.tolist() == [[3, 2, 1, 0], [0, 1, 2, 1]]
    assert s.coact_LEE[0, 0, 1] == 2 and s.coact_LEE[0, 1, 0] == 2 and s.coact_LEE[0, 0, 2] == 1
    assert s.coact_LEE[1, 2, 3] == 1 and s.coact_LEE[1, 1, 2] == 1
    assert np.all(np.diagonal(s.coact_LEE, axis1=1, axis2=2) == 0)
    assert s.trans_LEE.shape == (1, 4, 4)
    # token 0: {0,1} -> {2,3}; token 1: {0,2} -> {2,1}; token 2 has no layer 1
    assert s.trans_LEE[0, 0, 2] == 2 and s.trans_LEE[0, 0, 3] == 1 and s.trans_LEE[0, 2, 1] == 1
    assert s.trans_LEE[0].sum() == 8
    assert s.num_tokens == 3


def test_npz_round_trip(tmp_path):
    s = from_topk_ids(_ids(), 4, meta={"model": "toy"})
    path = tmp_path / "stats.npz"
    s.save(path)
    back = load_routing(path)
    assert np.array_equal(back.topk_ids_TLK, s.topk_ids_TLK)
    for name in ("load_LE", "coact_LEE", "trans_LEE"):
        assert np.array_equal(getattr(back, name), getattr(s, name))
    assert back.k == 2 and back.num_experts == 4 and back.meta["model"] == "toy"


def test_moetrain_file_aggregates_win(tmp_path):
    """moetrain's file: ids are a sample, the aggregates cover more tokens and are used as is."""
    s = from_topk_ids(_ids(), 4)
    path = tmp_path / "moetrain.npz"
    np.savez(path, topk_ids=_ids(), meta=json.dumps({"num_experts": 4, "k": 2}),
             load_LE=s.load_LE * 10, coact_LEE=s.coact_LEE * 10, trans_LEE=s.trans_LEE * 10)
    back = load_routing(path)
    assert np.array_equal(back.load_LE, s.load_LE * 10)
    assert back.topk_ids_TLK.shape == (3, 2, 2)


def test_real_traces_keep_logged_layers(qwen_path, olmoe_path):
    q = load_routing(qwen_path)
    assert q.layer_ids == (0, 8, 12, 18, 23) and q.num_experts == 60 and q.k == 4
    assert q.load_LE.shape == (5, 60) and q.trans_LEE.shape == (4, 60, 60)
    assert np.allclose(q.load_LE.sum(axis=1), q.num_tokens * 4)
    o = load_routing(olmoe_path)
    assert o.num_layers == 1 and o.k == 8 and o.load_LE.max() / o.load_LE.mean() > 4


def test_split_tokens_disjoint_and_complete():
    ids = np.random.default_rng(0).integers(0, 8, size=(101, 2, 1)).astype(np.int16)
    fit, held = split_tokens(ids, seed=3)
    assert len(fit) + len(held) == 101 and abs(len(fit) - len(held)) <= 1
    s = from_topk_ids(ids, 8)
    sf, sh = split_tokens(s, seed=3)
    assert np.allclose(sf.load_LE + sh.load_LE, s.load_LE)
    again, _ = split_tokens(s, seed=3)
    assert np.array_equal(again.topk_ids_TLK, sf.topk_ids_TLK)


@pytest.mark.parametrize("ids,num_experts,match", [
    (np.zeros((3, 2), dtype=np.int16), 4, "3-D"),
    (np.full((2, 1, 2), 4, dtype=np.int16), 4, r"\[0, 4\)"),
    (np.full((2, 1, 2), -2, dtype=np.int16), 4, "expert ids"),
    (np.array([[[1, 1]]]), 4, "same expert twice"),
    (np.zeros((2, 1, 2), dtype=np.float32), 4, "integers"),
])
def test_bad_ids(ids, num_experts, match):
    with pytest.raises(StatsError, match=match):
        from_topk_ids(ids, num_experts)


def test_bad_aggregates():
    load = np.ones((2, 4))
    coact = np.zeros((2, 4, 4))
    with pytest.raises(StatsError, match="negative"):
        from_aggregates(-load, coact, k=2)
    with pytest.raises(StatsError, match="coact_LEE has shape"):
        from_aggregates(load, np.zeros((2, 3, 3)), k=2)
    bad = coact.copy()
    bad[0, 0, 1] = 1
    with pytest.raises(StatsError, match="symmetric"):
        from_aggregates(load, bad, k=2)
    with pytest.raises(StatsError, match="k must be"):
        from_aggregates(load, coact, k=5)
    with pytest.raises(StatsError, match="trans_LEE"):
        RoutingStats(4, 2, load, coact, np.zeros((2, 4, 4)))


def test_bad_files(tmp_path):
    with pytest.raises(StatsError, match="does not exist"):
        load_routing(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(StatsError, match="not a readable"):
        load_routing(tmp_path / "junk.npz")
    np.savez(tmp_path / "nometa.npz", topk_ids=np.zeros((1, 1, 1), dtype=np.int16))
    with pytest.raises(StatsError, match="'meta'"):
        load_routing(tmp_path / "nometa.npz")
    np.savez(tmp_path / "badk.npz", topk_ids=np.zeros((1, 1, 2), dtype=np.int16),
             meta=json.dumps({"num_experts": 4, "k": 3}))
    with pytest.raises(StatsError, match="k=3"):
        load_routing(tmp_path / "badk.npz")


def test_trace_without_layers_present_keeps_only_logged_layers(qwen_path, tmp_path):
    """A trace written without ``layers_present`` (24 layers, 5 logged): the all -1 layers are
    not read as free, empty layers (they used to drag contiguous's sends from 2.05 to 0.087)."""
    from placement.cost import evaluate
    from placement.placement import Placement
    from placement.topology import Topology
    with np.load(qwen_path) as z:
        ids, meta = z["topk_ids"], z["meta"]
    assert ids.shape[1] == 24
    path = tmp_path / "no_layers_present.npz"
    np.savez(path, topk_ids=ids, meta=meta)
    back, ref = load_routing(path), load_routing(qwen_path)
    assert back.layer_ids == (0, 8, 12, 18, 23) and np.array_equal(back.load_LE, ref.load_LE)
    topo = Topology(4, 15)
    p = Placement.contiguous(5, 60, 4)
    assert evaluate(back, p, topo).sends == pytest.approx(evaluate(ref, p, topo).sends)
    assert evaluate(back, p, topo).sends > 1.5
    np.savez(tmp_path / "empty.npz", topk_ids=np.full((3, 2, 2), -1, dtype=np.int16),
             meta=json.dumps({"num_experts": 4, "k": 2}))
    with pytest.raises(StatsError, match="no expert id"):
        load_routing(tmp_path / "empty.npz")
