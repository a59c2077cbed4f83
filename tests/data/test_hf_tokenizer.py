"""``data.tokenizer=hf:DIR``: documents are tokenized with DIR/tokenizer.json, each followed by
the end-of-text id named in DIR/tokenizer_config.json; the trained BPE stays the default."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from moetrain.config import DataConfig, StoreConfig
from moetrain.data import DataError, build_dataset


def word_tokenizer(d, eos: str = "<eos>"):
    """A word-level tokenizer: ids are easy to predict by hand."""
    vocab = {"<eos>": 0, "<unk>": 1, "a": 2, "b": 3, "c": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<eos>"])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos}}))
    return d


def test_hf_tokenizer_packs_documents_with_its_own_ids(tmp_path):
    tok_dir = word_tokenizer(tmp_path / "tok")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "1.txt").write_text("a b c a b c")
    (docs / "2.txt").write_text("c c b <eos> z")  # literal special text and an unknown word
    cfg = DataConfig(source="paths", paths=[f"text={docs}"], tokenizer=f"hf:{tok_dir}", seq_len=3,
                     val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    ds = build_dataset(cfg)
    assert ds.vocab_size == 5 and ds.eot_id == 0
    # doc 1: a b c a b c <eos> = 2 3 4 2 3 4 0; doc 2: c c b = 4 4 3, the literal "<eos>" as plain
    # text (Whitespace splits it into "<", "eos", ">": 3 x unk), z = unk, then <eos>
    stream = [2, 3, 4, 2, 3, 4, 0, 4, 4, 3, 1, 1, 1, 1, 0]
    want = sorted(tuple(stream[i:i + 4]) for i in range(0, 12, 4))  # rows of seq_len + 1, tail dropped
    rows = [tuple(r) for split in (ds.train, ds.val) for r in split.tokens_NT1.tolist()]
    assert sorted(rows) == want
    assert ds.stats["text"]["tokens"] == len(stream)


def test_missing_tokenizer_json_and_missing_eos_are_named(tmp_path):
    cfg = DataConfig(tokenizer=f"hf:{tmp_path / 'nowhere'}", cache_dir=str(tmp_path / "cache"),
                     max_bytes_per_domain=10_000)
    with pytest.raises(DataError, match="nowhere/tokenizer.json not found"):
        build_dataset(cfg)
    tok_dir = word_tokenizer(tmp_path / "tok", eos="</s>")  # names a token the vocabulary lacks
    cfg = DataConfig(tokenizer=f"hf:{tok_dir}", cache_dir=str(tmp_path / "cache"), max_bytes_per_domain=10_000)
    with pytest.raises(DataError, match="no end-of-text token"):
        build_dataset(cfg)


def test_hf_tokenizer_from_object_storage(tmp_path, s3_server):
    # the same word-level tokenizer, uploaded to the S3 server: same ids, same hash as the local copy
    from moetrain.data.training import resolve_tokenizer

    tok_dir = word_tokenizer(tmp_path / "tok", eos="c")
    client = s3_server.client()
    for f in tok_dir.iterdir():
        client.put_object(Bucket=s3_server.bucket, Key=f"tok/{f.name}", Body=f.read_bytes())
    store = StoreConfig(s3_endpoint=s3_server.endpoint)
    remote = DataConfig(tokenizer=f"hf:{s3_server.uri('tok')}")
    tok, sha, eot = resolve_tokenizer(remote, store_cfg=store)
    _, local_sha, _ = resolve_tokenizer(DataConfig(tokenizer=f"hf:{tok_dir}"))
    assert eot == 4 and sha == local_sha  # eos "c" -> id 4, read from the remote tokenizer_config.json
    assert tok.encode("b a").ids == [3, 2]
    missing = DataConfig(tokenizer=f"hf:{s3_server.uri('nothing')}")
    with pytest.raises(DataError, match="nothing/tokenizer.json not found"):
        resolve_tokenizer(missing, store_cfg=store)
