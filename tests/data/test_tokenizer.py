"""Byte-level BPE: lossless round trip on real code and prose, determinism, cache file."""

from __future__ import annotations

import inspect
import json

from moetrain.data.corpus import Corpus
from moetrain.data.tokenizer import EOT, build_tokenizer, encode_docs, train_tokenizer


def _real_texts() -> dict[str, str]:
    import json.decoder as code_module
    from pydoc_data.topics import topics

    return {
        "code": inspect.getsource(code_module),
        "prose": topics["assignment"],
        "tricky": "naïve café — 数据 🙂\ttabs\r\nCRLF  double  spaces " + EOT + " literal",
    }


def test_round_trip_code_and_prose(built):
    _, ds, _ = built
    tok = ds.tokenizer
    for name, text in _real_texts().items():
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text, name
        assert ds.eot_id not in ids, f"{name}: literal {EOT!r} must stay plain text"
    code_ids = tok.encode(_real_texts()["code"]).ids
    assert len(code_ids) < len(_real_texts()["code"]) / 2  # BPE merges actually compress


def test_training_deterministic_and_sized():
    corpus = Corpus(domains=("a", "b"), docs=((_real_texts()["code"],), (_real_texts()["prose"],)))
    one, two = train_tokenizer(corpus, 400), train_tokenizer(corpus, 400)
    assert one.to_str() == two.to_str()
    assert one.get_vocab_size() == 400
    assert one.token_to_id(EOT) == 0


def test_cache_file_reused(tmp_path):
    corpus = Corpus(domains=("p",), docs=((_real_texts()["prose"],),))
    tok, sha, hit = build_tokenizer(corpus, corpus.content_hash(), 300, tmp_path)
    tok2, sha2, hit2 = build_tokenizer(corpus, corpus.content_hash(), 300, tmp_path)
    assert (hit, hit2) == (False, True) and sha == sha2
    assert tok.to_str() == tok2.to_str()
    files = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(files) == 1 and json.loads(files[0].read_text())["model"]["type"] == "BPE"
    _, sha3, hit3 = build_tokenizer(corpus, corpus.content_hash(), 320, tmp_path)
    assert not hit3 and sha3 != sha


def test_encode_docs_int32(built):
    _, ds, _ = built
    arrays = encode_docs(ds.tokenizer, ["x = 1\n", "hello world"])
    assert [a.dtype.name for a in arrays] == ["int32", "int32"]
    assert ds.tokenizer.decode(arrays[1].tolist()) == "hello world"
