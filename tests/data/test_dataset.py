"""build_dataset end to end: shapes, cache hits, determinism, user paths, concurrency, val batches."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from moetrain.config import DataConfig
from moetrain.data import DataError, build_dataset, val_batches
from moetrain.data.cache import cache_root

from .conftest import SMALL_SEQ, SMALL_VOCAB, small_cfg


def test_builtin_dataset_shapes_and_domains(built):
    cfg, ds, _ = built
    assert ds.domains == ["code", "english"] and ds.vocab_size == SMALL_VOCAB
    for split in (ds.train, ds.val):
        assert split.tokens_NT1.dtype == np.int32 and split.tokens_NT1.shape[1] == SMALL_SEQ + 1
        assert split.domain_N.dtype == np.int16 and split.domain_N.shape == (len(split),)
        assert set(np.unique(split.domain_N)) == {0, 1}
        assert 0 <= split.tokens_NT1.min() and split.tokens_NT1.max() < ds.vocab_size
        assert not split.tokens_NT1.flags.writeable
    for d, name in enumerate(ds.domains):
        n_val = int(np.sum(ds.val.domain_N == d))
        n_all = ds.stats[name]["rows"]
        assert n_val == max(1, round(n_all * cfg.val_fraction))
        assert n_val + int(np.sum(ds.train.domain_N == d)) == n_all
    assert np.sum(ds.train.tokens_NT1 == ds.eot_id) > 50  # documents are separated
    text = ds.tokenizer.decode(ds.train.tokens_NT1[ds.train.domain_N == 0][0].tolist())
    assert len(text) > SMALL_SEQ  # real multi-byte-per-token text
    summary = ds.summary()
    assert "code" in summary and "english" in summary and ds.fingerprint[:12] in summary


def test_second_build_hits_cache(built):
    cfg, ds, cold_s = built
    t0 = time.perf_counter()
    warm = build_dataset(cfg)
    warm_s = time.perf_counter() - t0
    assert warm.cache_hits == {"tokenizer": True, "packed": True}
    assert ds.cache_hits == {"tokenizer": False, "packed": False}
    assert warm.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(warm.train.tokens_NT1, ds.train.tokens_NT1)
    np.testing.assert_array_equal(warm.val.domain_N, ds.val.domain_N)
    assert warm_s < cold_s, (warm_s, cold_s)


def test_fresh_build_is_deterministic(built, tmp_path):
    cfg, ds, _ = built
    again = build_dataset(dataclasses.replace(cfg, cache_dir=str(tmp_path)))
    assert again.cache_hits == {"tokenizer": False, "packed": False}
    assert again.fingerprint == ds.fingerprint
    assert again.tokenizer.to_str() == ds.tokenizer.to_str()
    np.testing.assert_array_equal(again.train.tokens_NT1, ds.train.tokens_NT1)
    np.testing.assert_array_equal(again.val.tokens_NT1, ds.val.tokens_NT1)


def test_split_settings_reuse_cache_but_change_fingerprint(built):
    cfg, ds, _ = built
    other = build_dataset(dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert other.cache_hits == {"tokenizer": True, "packed": True}
    assert other.fingerprint != ds.fingerprint
    assert len(other.val) == len(ds.val)
    assert not np.array_equal(other.val.tokens_NT1, ds.val.tokens_NT1)


def test_val_batches(built):
    _, ds, _ = built
    batches = val_batches(ds.val, "english", batch_size=2, max_batches=3)
    english_NT1 = ds.val.tokens_NT1[ds.val.domain_N == 1]
    assert len(batches) == 3 and all(b.shape == (2, SMALL_SEQ + 1) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), english_NT1[:6])
    every = val_batches(ds.val, "code", batch_size=3)
    assert len(every) == int(np.sum(ds.val.domain_N == 0)) // 3
    big = val_batches(ds.val, "english", batch_size=10_000)
    assert len(big) == 1 and len(big[0]) == len(english_NT1)
    with pytest.raises(DataError, match=r"'klingon'.*\['code', 'english'\]"):
        val_batches(ds.val, "klingon", 2)


def _corpus_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A text directory and a JSONL file of real stdlib text (two domains)."""
    import email
    import json as json_mod

    text_dir = tmp_path / "src"
    text_dir.mkdir()
    for module in (email, json_mod):
        for path in sorted(Path(module.__file__).parent.glob("*.py"))[:6]:
            (text_dir / f"{module.__name__}_{path.name}.txt").write_text(path.read_text())
    from pydoc_data.topics import topics

    jl = tmp_path / "topics.jsonl"
    jl.write_text("\n".join(json.dumps({"text": topics[k]}) for k in sorted(topics)[:20]))
    return text_dir, jl


def test_user_paths_dataset(tmp_path):
    text_dir, jl = _corpus_dir(tmp_path)
    cfg = DataConfig(source="paths", paths=[f"src={text_dir}", f"help={jl}"], vocab_size=300,
                     seq_len=32, cache_dir=str(tmp_path / "cache"))
    ds = build_dataset(cfg)
    assert ds.domains == ["src", "help"]
    assert set(np.unique(ds.val.domain_N)) == {0, 1}
    first_src = ds.tokenizer.decode(ds.train.tokens_NT1[0].tolist())
    assert first_src and first_src in "".join(p.read_text() for p in sorted(text_dir.iterdir()))


def test_too_small_domain_is_named(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words")
    big = tmp_path / "big.txt"
    big.write_text("plenty of text here. " * 400)
    cfg = DataConfig(source="paths", paths=[f"big={big}", f"tiny={tiny}"], vocab_size=300,
                     seq_len=32, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"domain 'tiny'"):
        build_dataset(cfg)


def test_config_errors_name_field(tmp_path):
    with pytest.raises(DataError, match=r"data.seed \(-1\)"):
        build_dataset(small_cfg(tmp_path, seed=-1))
    with pytest.raises(DataError, match=r"data.val_fraction \(0.7\)"):
        build_dataset(small_cfg(tmp_path, val_fraction=0.7))


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETRAIN_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(DataConfig()) == tmp_path / "env" / "data"
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg" / "data"
    monkeypatch.delenv("MOETRAIN_CACHE_DIR")
    assert cache_root(DataConfig(cache_dir="")) == Path("~/.cache/moetrain/data").expanduser()


def _build_in_child(cfg: DataConfig, queue) -> None:
    ds = build_dataset(cfg)
    queue.put((ds.fingerprint, ds.cache_hits["packed"], int(ds.train.tokens_NT1.sum())))


def test_concurrent_builds_share_one_cache(tmp_path):
    text_dir, jl = _corpus_dir(tmp_path)
    cfg = DataConfig(source="paths", paths=[f"src={text_dir}", f"help={jl}"], vocab_size=300,
                     seq_len=32, cache_dir=str(tmp_path / "cache"))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(cfg, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({(fp, s) for fp, _, s in results}) == 1
    assert sorted(hit for _, hit, _ in results) == [False, True, True]  # built once, then loaded
    files = sorted(p.name for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith("."))
    assert len(files) == 2  # one tokenizer, one packed file; no stray temp files
    assert not [p for p in (tmp_path / "cache" / "data").iterdir() if ".tmp-" in p.name]
