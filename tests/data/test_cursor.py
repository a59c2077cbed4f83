"""BatchCursor exact save/restore, epoch shuffling, and the global-batch shard layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moetrain.data import BatchCursor, DataError, shard_global_batch


def _run(cursor: BatchCursor, steps: int) -> list[np.ndarray]:
    return [cursor.next_indices() for _ in range(steps)]


def test_epoch_is_a_shuffled_partition():
    cursor = BatchCursor(num_rows=23, global_batch_size=5, seed=7)
    assert cursor.batches_per_epoch == 4
    epoch0 = np.concatenate(_run(cursor, 4))
    epoch1 = np.concatenate(_run(cursor, 4))
    for epoch in (epoch0, epoch1):
        assert len(np.unique(epoch)) == 20 and epoch.min() >= 0 and epoch.max() < 23
    assert cursor.epoch == 1
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.sort(epoch0))


@pytest.mark.parametrize("save_at", [0, 2, 4, 5, 9])  # start, mid-epoch, at / past the boundary
def test_restore_is_exact(save_at):
    reference = BatchCursor(num_rows=23, global_batch_size=5, seed=11)
    _run(reference, save_at)
    state = json.loads(json.dumps(reference.state_dict()))  # must survive JSON
    expected = _run(reference, 10)

    restored = BatchCursor(num_rows=23, global_batch_size=5, seed=0)  # seed comes from the state
    _run(restored, 3)  # a used cursor is fully overwritten by the state
    restored.load_state_dict(state)
    for want, got in zip(expected, _run(restored, 10)):
        np.testing.assert_array_equal(got, want)


def test_seed_changes_order():
    a = np.concatenate(_run(BatchCursor(100, 10, seed=1), 10))
    b = np.concatenate(_run(BatchCursor(100, 10, seed=2), 10))
    assert not np.array_equal(a, b)


def test_cursor_errors_name_numbers():
    with pytest.raises(DataError, match=r"num_rows \(3\).*global_batch_size \(8\)"):
        BatchCursor(num_rows=3, global_batch_size=8, seed=0)
    state = BatchCursor(50, 5, 0).state_dict()
    with pytest.raises(DataError, match=r"num_rows=50.*num_rows=60"):
        BatchCursor(60, 5, 0).load_state_dict(state)
    with pytest.raises(DataError, match=r"global_batch_size=5.*global_batch_size=10"):
        BatchCursor(50, 10, 0).load_state_dict(state)


@pytest.mark.parametrize("num_micro,world_size", [(1, 1), (1, 4), (2, 2), (3, 2), (2, 4)])
def test_shard_layout_matches_single_process(num_micro, world_size):
    B, T1 = 24, 5
    batch_BT1 = np.arange(B * T1, dtype=np.int32).reshape(B, T1)
    single = shard_global_batch(batch_BT1, num_micro, 1, 0)
    per_rank = [shard_global_batch(batch_BT1, num_micro, world_size, r) for r in range(world_size)]
    b = B // (num_micro * world_size)
    for m in range(num_micro):
        assert all(per_rank[r][m].shape == (b, T1) for r in range(world_size))
        np.testing.assert_array_equal(np.concatenate([per_rank[r][m] for r in range(world_size)]), single[m])
    every_row = np.concatenate([x for rank in per_rank for x in rank])
    np.testing.assert_array_equal(np.sort(every_row[:, 0]), batch_BT1[:, 0])


def test_shard_errors():
    batch = np.zeros((10, 3), dtype=np.int32)
    with pytest.raises(DataError, match=r"global batch size \(10\).*2 x 3 = 6"):
        shard_global_batch(batch, 2, 3, 0)
    with pytest.raises(DataError, match=r"rank \(2\)"):
        shard_global_batch(batch, 1, 2, 2)
