"""Streaming prepared shards: the split, the mixture, each rank's rows, and a bit-exact resume.

The prepared corpus here is synthetic: row ``g`` of domain ``d`` holds ``[d, g, g, g]``, so every
row read says where it came from. Shards are tiny (3-7 rows), so a few steps cross many shard
and epoch boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moetrain.config import DataConfig
from moetrain.data import DataError
from moetrain.data.cursor import shard_global_batch
from moetrain.data.shards import MANIFEST, ShardInfo, make_manifest, read_manifest, shard_bytes
from moetrain.data.store import open_data_store
from moetrain.data.stream import train_to_global
from moetrain.data.training import StreamingData

SEQ = 3  # rows of 4 tokens
SHARDS = {"a": [5, 7, 3, 6], "b": [4, 4]}  # rows per shard: a has 21 rows, b 8


def write_synthetic(root, shards=SHARDS) -> str:
    infos = []
    for d, (name, sizes) in enumerate(shards.items()):
        g = 0
        for j, n in enumerate(sizes):
            rows = np.array([[d, i, i, i] for i in range(g, g + n)], dtype=np.int32)
            key = f"shards/{name}/{j:03d}.parquet"
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(shard_bytes(rows, name, n * 4, 1))
            infos.append(ShardInfo(key=key, domain=name, rows=n, tokens=n * 4, docs=1))
            g += n
    m = make_manifest(infos, seq_len=SEQ, tokenizer_sha256="0" * 64, vocab_size=300, eot_id=0)
    (root / MANIFEST).write_text(m.to_json())
    return str(root)


def open_data(uri, batch=8, **kw) -> StreamingData:
    cfg = DataConfig(source="prepared", prepared_uri=uri, seq_len=SEQ, val_fraction=0.25, **kw)
    store = open_data_store(uri)
    return StreamingData(store, read_manifest(store), cfg, batch)


def test_split_and_every_training_row_once_per_epoch(tmp_path):
    data = open_data(write_synthetic(tmp_path))
    # k = 4: rows 0, 4, 8, ... are validation rows; a: 21 rows -> 6 val, 15 train; b: 8 -> 2, 6
    assert data.train_rows_D.tolist() == [15, 6] and data.val_rows_D.tolist() == [6, 2]
    assert train_to_global(np.arange(7), 4).tolist() == [1, 2, 3, 5, 6, 7, 9]
    seen = {0: [], 1: []}
    for _ in range(7):  # (15 + 6) training rows per epoch; mixture = train rows: 15 a : 6 b
        (mb,) = data.next_micro_batches(1, 1, 0)
        for d, g in mb[:, :2].tolist():
            seen[d].append(g)
    # 7 steps x 8 rows = 56 picks in the ratio 15:6 -> a: 40 rows (2 epochs + 10), b: 16 (2 epochs + 4)
    # so each training row comes 2 times, 10 (a) / 4 (b) of them 3 times; validation rows never
    for d, n, val, extra in ((0, 21, {0, 4, 8, 12, 16, 20}, 10), (1, 8, {0, 4}, 4)):
        times = np.bincount(seen[d], minlength=n)
        assert all(times[g] == 0 for g in val)
        train = np.array([times[g] for g in range(n) if g not in val])
        assert set(train.tolist()) <= {2, 3} and int((train == 3).sum()) == extra
    vb = data.val_batches("a", 4, 10, 1, 0)
    assert [b[:, 1].tolist() for b in vb] == [[0, 4, 8, 12]]  # 6 val rows -> one full batch of 4


def test_mixture_sets_rows_per_domain(tmp_path):
    uri = write_synthetic(tmp_path)
    data = open_data(uri, mixture=["a=3", "b=1"])
    counts = np.zeros(2, dtype=int)
    for _ in range(10):
        (mb,) = data.next_micro_batches(1, 1, 0)
        step = np.bincount(mb[:, 0], minlength=2)
        assert step.tolist() == [6, 2]  # exactly 3:1 in every batch of 8
        counts += step
    only_a = open_data(uri, mixture=["a=1"])
    assert set(only_a.next_micro_batches(1, 1, 0)[0][:, 0].tolist()) == {0}
    with pytest.raises(DataError, match=r"data.mixture names domain\(s\) \['c'\]"):
        open_data(uri, mixture=["c=1"])


def test_each_rank_reads_its_own_rows(tmp_path):
    uri = write_synthetic(tmp_path)
    whole = open_data(uri)
    ranks = [open_data(uri) for _ in range(2)]
    for _ in range(5):
        (ref,) = whole.next_micro_batches(1, 1, 0)
        mine = [ranks[r].next_micro_batches(2, 2, r) for r in range(2)]
        # world 1 sees the concatenation, per micro-batch, of the ranks' slices
        assert np.array_equal(np.concatenate([mine[0][0], mine[1][0], mine[0][1], mine[1][1]]),
                              np.concatenate(shard_global_batch(ref, 2, 2, 0) + shard_global_batch(ref, 2, 2, 1))[
                                  [0, 1, 4, 5, 2, 3, 6, 7]])


def test_resume_is_bit_exact_across_shards_and_epochs(tmp_path):
    uri = write_synthetic(tmp_path)
    straight = open_data(uri, mixture=["a=2", "b=1"])
    full = [straight.next_micro_batches(2, 2, 1) for _ in range(15)]
    first = open_data(uri, mixture=["a=2", "b=1"])
    for _ in range(6):
        first.next_micro_batches(2, 2, 1)
    state = first.cursor.state_dict()
    assert state["epoch"][1] >= 1  # b (8 rows, 6 train) has already wrapped
    resumed = open_data(uri, mixture=["a=2", "b=1"])
    resumed.cursor.load_state_dict(state)
    rest = [resumed.next_micro_batches(2, 2, 1) for _ in range(9)]
    for got, want in zip(rest, full[6:]):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    other = open_data(uri, mixture=["a=1", "b=1"])
    with pytest.raises(DataError, match="mixture or batch size changed"):
        other.cursor.load_state_dict(state)


def test_source_prepared_opens_the_uri(tmp_path):
    from moetrain.data.training import open_training_data

    uri = write_synthetic(tmp_path)
    data = open_training_data(DataConfig(source="prepared", prepared_uri=uri, seq_len=SEQ, val_fraction=0.25), 8)
    assert data.domains == ["a", "b"] and data.vocab_size == 300
    assert set(data.next_micro_batches(1, 1, 0)[0][:, 0].tolist()) == {0, 1}
    with pytest.raises(DataError, match="does not exist: run `moetrain prepare`"):
        open_training_data(DataConfig(source="prepared", prepared_uri=str(tmp_path / "none"), seq_len=SEQ), 8)
    with pytest.raises(DataError, match=r"data.seq_len \(4\) differs from the prepared data's seq_len \(3\)"):
        open_training_data(DataConfig(source="prepared", prepared_uri=uri, seq_len=4), 8)


def test_builtin_is_prepared_into_the_cache_once_then_streamed(tmp_path):
    from moetrain.data.training import open_training_data

    cfg = DataConfig(max_bytes_per_domain=200_000, vocab_size=300, seq_len=32, cache_dir=str(tmp_path))
    data = open_training_data(cfg, 8)
    root = Path(data.reader.store.uri)
    assert root.parent == tmp_path / "data" and root.name.startswith("prepared-")
    assert data.domains == ["code", "english"] and len(data.manifest.shards) == 2  # one shard per domain
    mtime = (root / MANIFEST).stat().st_mtime_ns
    again = open_training_data(cfg, 8)
    assert (root / MANIFEST).stat().st_mtime_ns == mtime
    assert all(np.array_equal(x, y) for x, y in zip(data.next_micro_batches(2, 2, 0), again.next_micro_batches(2, 2, 0)))
