"""Corpus loading: the builtin stdlib/pydoc corpus, user paths, caps and input errors."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moetrain.config import DataConfig
from moetrain.data import DataError, load_corpus
from moetrain.data.corpus import cap_docs

from .conftest import SMALL_CAP


def _paths_cfg(*entries, **kw) -> DataConfig:
    return DataConfig(source="paths", paths=list(entries), max_bytes_per_domain=kw.pop("cap", 10**6), **kw)


def test_builtin_corpus_real_text_and_capped():
    corpus = load_corpus(DataConfig(max_bytes_per_domain=SMALL_CAP))
    assert corpus.domains == ("code", "english")
    code, english = ("".join(d) for d in corpus.docs)
    assert corpus.num_bytes("code") == SMALL_CAP and corpus.num_bytes("english") == SMALL_CAP
    # Real stdlib source: the first file of the sorted walk, verbatim.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    first = sorted(p for p in stdlib.glob("*.py"))[0].read_text(encoding="utf-8")
    assert corpus.docs[0][0] == first
    assert code.count("def ") > 100 and code.count("import ") > 20
    # Real prose: the first pydoc topic in key order, and plenty of English words.
    from pydoc_data.topics import topics
    assert corpus.docs[1][0] == topics[sorted(topics)[0]]
    assert english.count(" the ") > 500


def test_builtin_corpus_deterministic():
    a = load_corpus(DataConfig(max_bytes_per_domain=SMALL_CAP))
    b = load_corpus(DataConfig(max_bytes_per_domain=SMALL_CAP))
    assert a == b and a.content_hash() == b.content_hash()
    c = load_corpus(DataConfig(max_bytes_per_domain=SMALL_CAP + 1))
    assert c.content_hash() != a.content_hash()


def test_cap_docs_exact_and_utf8_safe():
    docs = ["ab", "", "é" * 10, "never read"]
    out = cap_docs(iter(docs), 7)  # "ab" (2) + 5 bytes of "éééé..." -> 2 whole "é" (4 bytes)
    assert out == ["ab", "é" * 2]
    assert sum(len(d.encode()) for d in out) <= 7
    assert cap_docs(iter(["abc"]), 3) == ["abc"]


def test_text_directory_recursive_sorted(tmp_path):
    root = tmp_path / "txt"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("first doc\n")
    (root / "b" / "c.txt").write_text("second doc é\n")
    (root / ".hidden").write_text("skipped")
    single = tmp_path / "one.md"
    single.write_text("a single file")
    corpus = load_corpus(_paths_cfg(f"prose={root}", f"one={single}"))
    assert corpus.domains == ("prose", "one")
    assert corpus.docs == (("first doc\n", "second doc é\n"), ("a single file",))


def test_jsonl_and_parquet(tmp_path):
    texts = ["alpha doc", "beta doc", "gamma ünïcode"]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": texts + [None], "n": [1, 2, 3, 4]}), pqf)
    corpus = load_corpus(_paths_cfg(f"j={jl}", f"p={pqf}", text_field="body"))
    assert corpus.docs == (tuple(texts), tuple(texts))
    capped = load_corpus(_paths_cfg(f"j={jl}", text_field="body", cap=12))
    assert capped.docs == (("alpha doc", "bet"),)


def _raises(cfg: DataConfig, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        load_corpus(cfg)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


def test_path_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    _raises(_paths_cfg(f"x={missing}"), str(missing), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _raises(_paths_cfg(f"x={empty}"), str(empty), "empty file")
    emptydir = tmp_path / "emptydir"
    emptydir.mkdir()
    _raises(_paths_cfg(f"x={emptydir}"), str(emptydir), "empty directory")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\xff\xfe")
    _raises(_paths_cfg(f"x={binary}"), str(binary), "UTF-8")


def test_entry_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("text")
    _raises(_paths_cfg(str(f)), str(f), "domain=PATH")
    _raises(_paths_cfg("=" + str(f)), "domain=PATH")
    _raises(_paths_cfg(f"a b={f}"), "'a b'")
    _raises(_paths_cfg(f"dup={f}", f"dup={f}"), "'dup'", "more than once")


def test_jsonl_errors_name_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    _raises(_paths_cfg(f"x={bad}"), str(bad), "line 2", "not valid JSON")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n\n{"txt": "wrong key"}\n')
    _raises(_paths_cfg(f"x={nofield}"), str(nofield), "line 3", "'text'")
    wrongtype = tmp_path / "wrongtype.jsonl"
    wrongtype.write_text('{"text": 5}\n')
    _raises(_paths_cfg(f"x={wrongtype}"), "line 1", "int")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": null}\n')
    _raises(_paths_cfg(f"x={blank}"), "'x'", "no text")


def test_parquet_errors_name_column(tmp_path):
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a", "b"], "num": [1, 2]}), f)
    _raises(_paths_cfg(f"x={f}"), str(f), "'text'", "content")
    _raises(_paths_cfg(f"x={f}", text_field="num"), "'num'", "expected string")
    garbage = tmp_path / "g.parquet"
    garbage.write_text("not parquet at all")
    _raises(_paths_cfg(f"x={garbage}"), str(garbage), "Parquet")
