"""Packing rows, the Parquet row store, and the train/val split."""

from __future__ import annotations

import numpy as np
import pytest

from moetrain.data import DataError
from moetrain.data.corpus import Corpus
from moetrain.data.packing import pack_corpus, pack_stream, read_packed, split_rows, write_packed
from moetrain.data.tokenizer import EOT


def test_pack_stream_is_docs_plus_eot_cut_into_rows():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=n, dtype=np.int32) for n in (7, 0, 13, 4, 30)]
    rows_NT1 = pack_stream(docs, eot=0, seq_len=5)
    stream = np.concatenate([np.append(d, 0) for d in docs])
    assert rows_NT1.dtype == np.int32 and rows_NT1.shape == (len(stream) // 6, 6)
    np.testing.assert_array_equal(rows_NT1.reshape(-1), stream[: rows_NT1.size])


def test_pack_corpus_decodes_back_to_text(built):
    _, ds, _ = built
    from pydoc_data.topics import topics

    prose = tuple(topics[k] for k in sorted(topics)[:6])
    corpus = Corpus(domains=("code", "prose"), docs=(("def f(x):\n    return x\n",) * 40, prose))
    rows = pack_corpus(ds.tokenizer, corpus, ds.eot_id, seq_len=32)
    assert list(np.unique(rows.domain_N)) == [0, 1]
    prose_rows = rows.tokens_NT1[rows.domain_N == 1].reshape(-1).tolist()
    text = ds.tokenizer.decode(prose_rows, skip_special_tokens=False)
    joined = "".join(doc + EOT for doc in prose)
    assert len(text) > len(joined) * 0.9 and joined.startswith(text)
    assert rows.stats["prose"]["rows"] == int(np.sum(rows.domain_N == 1))


def test_parquet_round_trip(built, tmp_path):
    _, ds, _ = built
    corpus = Corpus(domains=("a", "b"), docs=(("some text here " * 50,), ("other words " * 60,)))
    rows = pack_corpus(ds.tokenizer, corpus, ds.eot_id, seq_len=16)
    write_packed(tmp_path / "r.parquet", rows)
    back = read_packed(tmp_path / "r.parquet")
    np.testing.assert_array_equal(back.tokens_NT1, rows.tokens_NT1)
    np.testing.assert_array_equal(back.domain_N, rows.domain_N)
    assert back.tokens_NT1.dtype == np.int32 and back.domain_N.dtype == np.int16
    assert back.domains == rows.domains and back.stats == rows.stats


def test_split_disjoint_deterministic_per_domain():
    domain_N = np.repeat(np.array([0, 1, 2], dtype=np.int16), [200, 3, 40])
    names = ("big", "tiny", "mid")
    train, val = split_rows(domain_N, names, 0.1, seed=3, seq_len=8)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(domain_N)))
    for d, n in enumerate([200, 3, 40]):
        assert np.sum(domain_N[val] == d) == max(1, round(n * 0.1))
    again = split_rows(domain_N, names, 0.1, seed=3, seq_len=8)
    np.testing.assert_array_equal(again[1], val)
    other = split_rows(domain_N, names, 0.1, seed=4, seq_len=8)
    assert not np.array_equal(other[1], val)
    # A domain's split does not depend on which other domains exist.
    alone = split_rows(domain_N[domain_N == 2] * 0, ("mid",), 0.1, seed=3, seq_len=8)
    np.testing.assert_array_equal(alone[1] + 203, val[domain_N[val] == 2])


def test_split_too_small_domain_names_it():
    domain_N = np.array([0, 0, 0, 1], dtype=np.int16)
    with pytest.raises(DataError, match=r"domain 'small'.*1 row.*data.seq_len\+1 = 9"):
        split_rows(domain_N, ("ok", "small"), 0.1, seed=0, seq_len=8)
