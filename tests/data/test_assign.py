"""data.rank_assignment: the domain -> rank map and the per-micro-batch row permutation."""

from __future__ import annotations

import numpy as np
import pytest

from moetrain.config import ConfigError, load_config
from moetrain.data import DataError
from moetrain.data.assign import assign_rows, domain_rank_map
from moetrain.data.cursor import shard_global_batch


def test_map_lays_domains_end_to_end_by_token_share():
    m = domain_rank_map(("a", "b", "c"), [2, 1, 1], 4)  # shares 0.5, 0.25, 0.25
    np.testing.assert_allclose(m.share_DR, [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert m.home_ranks("a") == (0, 1) and m.rank_domains(3) == ("c",)
    m2 = domain_rank_map(("a", "b"), [0.6, 0.4], 2)  # a fills rank 0 and 20% of rank 1
    np.testing.assert_allclose(m2.share_DR, [[1.0, 0.2], [0.0, 0.8]])
    np.testing.assert_allclose(m2.share_DR.sum(axis=0), 1.0)


def test_assign_rows_sorts_within_each_micro_batch_only():
    m = domain_rank_map(("a", "b"), [0.6, 0.4], 2)
    dom_B = np.array([1, 0, 1, 0, 0, 1, 0, 0])
    assert assign_rows(dom_B, 1, 2, m).tolist() == [1, 3, 4, 6, 7, 0, 2, 5]
    perm = assign_rows(dom_B, 2, 2, m)  # micro-batch 0 = rows 0-3, micro-batch 1 = rows 4-7
    assert perm.tolist() == [1, 3, 0, 2, 4, 6, 7, 5]
    ranks = [shard_global_batch(dom_B[perm], 2, 2, r) for r in range(2)]
    assert [x.tolist() for x in ranks[0]] == [[0, 0], [0, 0]]
    assert [x.tolist() for x in ranks[1]] == [[1, 1], [0, 1]]


def test_assign_rows_refuses_a_map_for_another_group_size():
    with pytest.raises(DataError, match="for 2 ranks, the group has 4"):
        assign_rows(np.zeros(8, dtype=np.int64), 1, 4, domain_rank_map(("a",), [1], 2))


def test_config_fields_are_validated():
    cfg = load_config("tiny", ["data.rank_assignment=domain", "data.mixture=code=3,english=1"])
    assert cfg.data.rank_assignment == "domain" and cfg.data.mixture == ["code=3", "english=1"]
    with pytest.raises(ConfigError, match=r"data.rank_assignment \('home'\)"):
        load_config("tiny", ["data.rank_assignment=home"])
    with pytest.raises(ConfigError, match="data.mixture entry 'code=-1'"):
        load_config("tiny", ["data.mixture=code=-1"])
    with pytest.raises(ConfigError, match="data.prepared_uri is empty"):
        load_config("tiny", ["data.source=prepared"])
