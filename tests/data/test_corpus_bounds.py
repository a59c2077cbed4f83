"""Corpus reading and tokenizer training are bounded by the data cap (issue #23, item 4): a file
is read only up to the cap, long runs without whitespace are cut before BPE training and
encoding, and what the cut changes stays lossless."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path

import pytest

from moetrain.config import DataConfig
from moetrain.data import DataError, load_corpus
from moetrain.data.corpus import cap_docs, read_path_docs
from moetrain.data.tokenizer import encode_docs, train_tokenizer, training_pieces


def _cfg(path: Path, cap: int) -> DataConfig:
    return DataConfig(source="paths", paths=[f"big={path}"], max_bytes_per_domain=cap)


def _rchar() -> int:
    """Bytes this process has read through read()-like calls so far (Linux /proc)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_training_pieces_cut_only_long_runs():
    assert list(training_pieces("ab cd\nef", max_word=4)) == ["ab cd\nef"]  # nothing longer: as is
    assert list(training_pieces("x abcdefghij y", max_word=4)) == ["x ", "abcd", "efgh", "ij", " y"]
    assert list(training_pieces("abcdefgh", max_word=4)) == ["abcd", "efgh"]
    assert "".join(training_pieces("q " + "z" * 1000 + " w")) == "q " + "z" * 1000 + " w"


def test_a_huge_file_is_read_only_up_to_the_cap(tmp_path):
    """1 GB of (sparse) text under a 1 MB cap: ~1 MB is read, not the file."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # NUL characters: valid UTF-8, one line, no disk used
    before = _rchar()
    corpus = load_corpus(_cfg(big, 1_000_000))
    read = _rchar() - before
    assert corpus.num_bytes("big") == 1_000_000
    assert read < 3_000_000, f"read {read} bytes of a 1 GB file under a 1 MB cap"


def test_directory_reading_stops_at_the_cap(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("a" * 600)
    (d / "b.txt").write_text("b" * 600)
    with open(d / "c.txt", "wb") as f:
        f.truncate(1 << 30)  # never needed: reading it would cost 1 GB
    before = _rchar()
    corpus = load_corpus(_cfg(d, 1000))
    assert _rchar() - before < 100_000
    assert corpus.docs[0] == ("a" * 600, "b" * 400)  # whole first file, second cut at the cap


def test_cut_inside_a_utf8_character_is_not_an_error(tmp_path):
    f = tmp_path / "u.txt"
    f.write_text("é" * 1000, encoding="utf-8")  # 2 bytes each
    docs = list(read_path_docs(f, "text", 5))  # 5 + 3 bytes read: 4 characters, a half one dropped
    assert docs == ["éééé"]
    assert cap_docs(iter(docs), 5) == ["éé"]  # the same result as cutting the whole text
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe and more text after it")
    with pytest.raises(DataError, match=r"not UTF-8 text .* at byte 3"):
        load_corpus(_cfg(bad, 10))


@pytest.mark.slow
def test_a_3mb_line_without_whitespace_trains_the_tokenizer_in_seconds(tmp_path):
    """Before the cut, HF's BPE trainer spent minutes on one 3 MB word (100 kB: 2 s)."""
    rng = random.Random(0)
    f = tmp_path / "line.txt"
    f.write_text("".join(rng.choices(string.ascii_letters, k=3_000_000)))
    corpus = load_corpus(_cfg(f, 4_000_000))
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus, 512)
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"tokenizer training took {seconds:.1f} s"
    assert tok.get_vocab_size() == 512
    ids = encode_docs(tok, [corpus.docs[0][0][:200_000]])[0]
    assert tok.decode(ids.tolist()) == corpus.docs[0][0][:200_000]  # cut runs stay lossless


def test_encoding_in_pieces_gives_the_whole_documents_ids():
    """Ordinary text is cut only at pre-token boundaries: the same ids as one encode."""
    rng = random.Random(1)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8))) for _ in range(300)]
    doc = "".join(" ".join(rng.choices(words, k=8)) + ("\n" if i % 3 else "\n  \n\tx ") for i in range(6_000))
    assert len(doc) > 2 * (1 << 16)  # several pieces
    corpus_tok = train_tokenizer(_corpus(doc[:50_000]), 400)
    ids = encode_docs(corpus_tok, [doc])[0]
    assert ids.tolist() == corpus_tok.encode(doc, add_special_tokens=False).ids


def _corpus(text: str):
    from moetrain.data.corpus import Corpus

    return Corpus(domains=("d",), docs=((text,),))
