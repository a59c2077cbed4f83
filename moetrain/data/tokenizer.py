"""The byte-level BPE tokenizer, trained on the corpus with HF ``tokenizers`` and cached.

Owns: training (``ByteLevel`` pre-tokenizer + decoder, ``BpeTrainer`` with the 256-byte initial
alphabet and the single special token ``<|endoftext|>``), the cache key of a trained tokenizer,
loading it back, and encoding documents to int32 arrays.

Properties: deterministic (same corpus + settings -> same vocab, across processes and thread
counts); lossless (``decode(encode(text)) == text`` for any text: every byte is in the alphabet,
and a literal ``"<|endoftext|>"`` inside a document is encoded as plain text, never as the
special id, because ``encode_special_tokens`` is switched on at load).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moetrain.config import StoreConfig
from moetrain.data.cache import cached, content_key
from moetrain.data.corpus import Corpus, cap_docs
from moetrain.data.store import open_data_store

log = logging.getLogger("moetrain")

EOT = "<|endoftext|>"
# Text used to train the BPE merges, split evenly over domains (the default corpus is ~4.5 MB,
# which trains in ~1 s on 2 cores). Part of the cache key.
TRAIN_BYTES_TOTAL = 8_000_000
# Runs of non-whitespace longer than this many characters are cut into pieces of this length
# before BPE training. The byte-level pre-tokenizer keeps a run of letters (or of digits, or of
# punctuation) as one word, and HF's BPE trainer is superlinear in a word's length: a 100 kB
# word took 2 s, a 3 MB line of letters minutes. Words this long are never worth a merge of
# their own; encoding is unaffected (it sees whole documents, and is fast on long words).
MAX_TRAIN_WORD_CHARS = 256
ENCODE_PIECE_CHARS = 1 << 16  # encoding: documents cut into pieces of about this many characters
ENCODE_BATCH_CHARS = 1 << 20  # encoding: characters handed to HF at a time
_LINE_START = re.compile(r"(?<=\n)\S")
_LONG_RUN = re.compile(r"\S{%d,}" % (MAX_TRAIN_WORD_CHARS + 1))
SETTINGS = {
    "kind": "byte-level-bpe",
    "format": 1,
    "special_tokens": [EOT],
    "add_prefix_space": False,
    "train_bytes_total": TRAIN_BYTES_TOTAL,
    "max_train_word_chars": MAX_TRAIN_WORD_CHARS,
    "tokenizers_version": tokenizers.__version__,
}


def tokenizer_key(corpus_hash: str, vocab_size: int) -> str:
    """Cache key of the tokenizer trained on a corpus with a vocab size and :data:`SETTINGS`."""
    return content_key({"corpus": corpus_hash, "vocab_size": vocab_size, "settings": SETTINGS})


def build_tokenizer(corpus: Corpus, corpus_hash: str, vocab_size: int, root: Path) -> tuple[Tokenizer, str, bool]:
    """Train (or load from ``root``) the tokenizer. Returns (tokenizer, content sha256, cache hit).

    The content sha256 is the hash of the saved JSON: downstream caches key on it.
    """
    path = root / f"tokenizer-{tokenizer_key(corpus_hash, vocab_size)[:24]}.json"

    def build(tmp: Path) -> None:
        train_tokenizer(corpus, vocab_size).save(str(tmp))

    tok, hit = cached(path, build, load_tokenizer)
    return tok, hashlib.sha256(path.read_bytes()).hexdigest(), hit


def train_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """A fresh byte-level BPE trained on (a per-domain even share of) the corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    share = TRAIN_BYTES_TOTAL // max(1, len(corpus.domains))
    texts = [piece for docs in corpus.docs for doc in cap_docs(iter(docs), share) for piece in training_pieces(doc)]
    nbytes = sum(len(t) for t in texts)
    t0 = time.perf_counter()
    log.info("training the byte-level BPE tokenizer (vocab %d) on %.1f MB of text", vocab_size, nbytes / 1e6)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    log.info("tokenizer trained in %.1f s", time.perf_counter() - t0)
    return tok


def training_pieces(doc: str, max_word: int = MAX_TRAIN_WORD_CHARS) -> Iterator[str]:
    """``doc`` as BPE training text: itself when it has no run of more than ``max_word``
    non-whitespace characters, else the text between such runs and each run cut into pieces of
    ``max_word`` characters (each its own training text, so no pre-token is longer)."""
    pattern = _LONG_RUN if max_word == MAX_TRAIN_WORD_CHARS else re.compile(r"\S{%d,}" % (max_word + 1))
    pos = 0
    for m in pattern.finditer(doc):
        if m.start() > pos:
            yield doc[pos : m.start()]
        for i in range(m.start(), m.end(), max_word):
            yield doc[i : min(i + max_word, m.end())]
        pos = m.end()
    if pos == 0:
        yield doc
    elif pos < len(doc):
        yield doc[pos:]


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a saved tokenizer; literal special-token text in inputs stays plain text."""
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


HF_PREFIX = "hf:"


def _eos_text(value) -> str:
    return str(value.get("content", "")) if isinstance(value, dict) else str(value or "")


def _hf_file_reader(spec: str, store_cfg: StoreConfig | None):
    """(where, read(name) -> bytes | None) for the directory an ``hf:`` spec names: a local path,
    or an ``s3://`` / ``gs://`` prefix read through the data store (same endpoints as the data)."""
    loc = spec[len(HF_PREFIX) :]
    if "://" not in loc:
        root = Path(loc).expanduser()
        return str(root), lambda name: (root / name).read_bytes() if (root / name).is_file() else None
    store = open_data_store(loc, store_cfg, probe=False)
    return loc.rstrip("/"), lambda name: store.read_bytes(name) if store.exists(name) else None


def load_hf_tokenizer(spec: str, store: StoreConfig | None = None) -> tuple[Tokenizer, str, int]:
    """``data.tokenizer=hf:DIR``: (DIR/tokenizer.json loaded, its content sha256, end-of-text id).
    DIR is a local path or an ``s3://`` / ``gs://`` prefix (endpoints from ``store``).

    The end-of-text token (appended to every document when packing) is ``eos_token`` of
    DIR/tokenizer_config.json, else ``eos_token_id`` of DIR/config.json. Literal special-token
    text inside documents stays plain text, as with the trained BPE."""
    import json

    from moetrain.data.errors import DataError

    where, read = _hf_file_reader(spec, store)
    raw = read("tokenizer.json")
    if raw is None:
        raise DataError(f"data.tokenizer ({spec!r}): {where}/tokenizer.json not found")
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(
            f"data.tokenizer ({spec!r}): {where}/tokenizer.json is not a tokenizers JSON file: {exc}"
        ) from None
    tok.encode_special_tokens = True
    eot = None
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
        text = read(name)
        value = json.loads(text).get(key) if text is not None else None
        if value is None:
            continue
        eot = (
            tok.token_to_id(_eos_text(value))
            if key == "eos_token"
            else (value[0] if isinstance(value, list) else value)
        )
        if eot is not None:
            break
    if eot is None:
        raise DataError(
            f"data.tokenizer ({spec!r}): no end-of-text token: set eos_token in "
            f"{where}/tokenizer_config.json or eos_token_id in {where}/config.json"
        )
    if isinstance(eot, bool) or not isinstance(eot, int) or not 0 <= eot < tok.get_vocab_size():
        raise DataError(
            f"data.tokenizer ({spec!r}): end-of-text id {eot!r} is outside the vocabulary of "
            f"{where}/tokenizer.json (vocab size {tok.get_vocab_size()})"
        )
    return tok, hashlib.sha256(raw).hexdigest(), int(eot)


def eot_id(tok: Tokenizer) -> int:
    ident = tok.token_to_id(EOT)
    if ident is None:
        raise ValueError(f"tokenizer has no {EOT!r} token")
    return ident


def splits_long_runs(tok: Tokenizer) -> bool:
    """Whether :func:`encode_docs` cuts documents for ``tok``: a plain byte-level pre-tokenizer
    (GPT-2's regex, no prefix space: the trained BPE), where pieces encoded one by one give ids
    that decode to the same bytes."""
    pre = tok.pre_tokenizer
    return isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space and pre.use_regex


def encode_docs(tok: Tokenizer, docs: tuple[str, ...] | list[str]) -> list[np.ndarray]:
    """Token ids of each document (no special tokens added), as int32 arrays.

    With a byte-level tokenizer (:func:`splits_long_runs`) a document is encoded in pieces of at
    most :data:`ENCODE_PIECE_CHARS`, :data:`ENCODE_BATCH_CHARS` at a time, ids joined: HF keeps
    ~200 bytes per token of an encoding and ~250 bytes per character of one pre-token word (a
    4 MB document: ~1 GB). Pieces end at a newline followed by a non-space character (a
    pre-token boundary: the ids are the same as the whole document's), and a run of more than
    :data:`MAX_TRAIN_WORD_CHARS` non-whitespace characters is cut as in training (lossless, but
    other ids than one huge word would get). Other tokenizers encode documents whole."""
    docs = list(docs)
    if not splits_long_runs(tok) or all(len(d) <= ENCODE_PIECE_CHARS and not _LONG_RUN.search(d) for d in docs):
        encodings = tok.encode_batch(docs, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
    out = []
    for doc in docs:
        ids: list[np.ndarray] = []
        batch: list[str] = []
        for piece in _encode_pieces(doc):
            batch.append(piece)
            if sum(map(len, batch)) >= ENCODE_BATCH_CHARS:
                ids += [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(batch, add_special_tokens=False)]
                batch = []
        if batch:
            ids += [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(batch, add_special_tokens=False)]
        out.append(np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32))
    return out


def _encode_pieces(doc: str) -> Iterator[str]:
    """``doc`` cut into :func:`training_pieces`, each longer one cut further after a newline
    that a non-space character follows, near every :data:`ENCODE_PIECE_CHARS` characters."""
    for piece in training_pieces(doc):
        start = 0
        while len(piece) - start > ENCODE_PIECE_CHARS:
            m = _LINE_START.search(piece, start + ENCODE_PIECE_CHARS)
            if m is None:
                break
            yield piece[start : m.start()]
            start = m.start()
        yield piece[start:] if start else piece
