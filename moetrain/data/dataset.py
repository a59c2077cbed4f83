"""The packed dataset a training run reads: build (or load from cache), splits, val batches.

Owns: :func:`build_dataset` (corpus -> tokenizer -> packed rows -> train/val split, each step
cached on disk by content hash), :class:`Split`, :class:`PackedDataset` and
:func:`val_batches`.

Shapes: ``N`` rows, ``T1`` = ``seq_len + 1`` tokens per row, ``B`` rows per batch.
Cache entries: ``tokenizer-<key>.json`` keyed by (corpus hash, vocab size, tokenizer settings)
(none with ``data.tokenizer=hf:DIR``: DIR/tokenizer.json is used as it is);
``packed-<key>.parquet`` keyed by (corpus hash, seq_len, tokenizer file hash). The split is
recomputed on load (it is cheap), so changing ``data.val_fraction`` or ``data.seed`` reuses both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from moetrain.config import DataConfig, StoreConfig
from moetrain.data.cache import cache_root, cached, content_key
from moetrain.data.corpus import load_corpus
from moetrain.data.errors import DataError
from moetrain.data.packing import PACK_FORMAT, PackedRows, pack_corpus, read_packed, split_rows, write_packed
from moetrain.data.tokenizer import HF_PREFIX, build_tokenizer, eot_id, load_hf_tokenizer


@dataclass(frozen=True)
class Split:
    """One split: rows and their domain labels (arrays are read-only)."""

    tokens_NT1: np.ndarray  # int32 [N, seq_len + 1]; inputs = [:, :-1], targets = [:, 1:]
    domain_N: np.ndarray  # int16 [N]; index into `domains`
    domains: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.tokens_NT1)


@dataclass(frozen=True)
class PackedDataset:
    """The result of :func:`build_dataset`."""

    train: Split
    val: Split
    domains: list[str]
    tokenizer: Tokenizer
    vocab_size: int  # the trained vocabulary's size (<= data.vocab_size); size embeddings by it
    eot_id: int  # id of <|endoftext|>, which ends every document in the packed stream
    seq_len: int
    fingerprint: str  # sha256 of (packed rows key, val_fraction, seed): equal => same splits
    stats: dict[str, dict[str, int]] = field(repr=False)  # per domain: docs, bytes, tokens, rows
    timings_s: dict[str, float] = field(repr=False, compare=False)  # corpus / tokenizer / pack
    cache_hits: dict[str, bool] = field(repr=False, compare=False)  # tokenizer / packed

    def summary(self) -> str:
        """A few human-readable lines: sizes per domain, vocab, fingerprint, cache hits, time."""
        lines = [
            f"dataset {self.fingerprint[:12]}  vocab={self.vocab_size}  seq_len={self.seq_len}"
            f"  train={len(self.train)} rows  val={len(self.val)} rows"
        ]
        for d, name in enumerate(self.domains):
            s = self.stats[name]
            n_tr = int(np.count_nonzero(self.train.domain_N == d))
            n_va = int(np.count_nonzero(self.val.domain_N == d))
            lines.append(
                f"  {name:<12} docs={s['docs']:<6} bytes={s['bytes']:<9} tokens={s['tokens']:<8}"
                f" bytes/token={s['bytes'] / max(1, s['tokens']):.2f}  train={n_tr}  val={n_va}"
            )
        hits = ", ".join(f"{k} {'hit' if v else 'built'}" for k, v in self.cache_hits.items())
        total = sum(self.timings_s.values())
        lines.append(f"  cache: {hits}; built in {total:.2f}s")
        return "\n".join(lines)


def build_dataset(cfg: DataConfig, store: StoreConfig | None = None) -> PackedDataset:
    """Build the dataset a config names, or load it from the cache (see module docstring);
    ``store`` (the ``storage`` section) opens an ``hf:`` tokenizer on S3 / GCS.

    Safe to call from several processes at once on the same cache directory.
    """
    _check_config(cfg)
    root = cache_root(cfg)
    t0 = time.perf_counter()
    corpus = load_corpus(cfg)
    corpus_hash = corpus.content_hash()
    t1 = time.perf_counter()
    if cfg.tokenizer.startswith(HF_PREFIX):  # the model's own tokenizer.json
        tok, tok_hash, eot = load_hf_tokenizer(cfg.tokenizer, store)
        tok_hit = True
    else:
        tok, tok_hash, tok_hit = build_tokenizer(corpus, corpus_hash, cfg.vocab_size, root)
        eot = eot_id(tok)
    t2 = time.perf_counter()
    packed_key = content_key(
        {"corpus": corpus_hash, "seq_len": cfg.seq_len, "tokenizer": tok_hash, "eot": eot, "format": PACK_FORMAT}
    )

    def build(tmp: Path) -> None:
        write_packed(tmp, pack_corpus(tok, corpus, eot, cfg.seq_len))

    rows, pack_hit = cached(root / f"packed-{packed_key[:24]}.parquet", build, read_packed)
    train_idx, val_idx = split_rows(rows.domain_N, rows.domains, cfg.val_fraction, cfg.seed, cfg.seq_len)
    t3 = time.perf_counter()
    return PackedDataset(
        train=_take(rows, train_idx),
        val=_take(rows, val_idx),
        domains=list(rows.domains),
        tokenizer=tok,
        vocab_size=tok.get_vocab_size(),
        eot_id=eot,
        seq_len=cfg.seq_len,
        fingerprint=content_key({"packed": packed_key, "val_fraction": cfg.val_fraction, "seed": cfg.seed}),
        stats=rows.stats,
        timings_s={"corpus": t1 - t0, "tokenizer": t2 - t1, "pack": t3 - t2},
        cache_hits={"tokenizer": tok_hit, "packed": pack_hit},
    )


def val_batches(split: Split, domain: str, batch_size: int, max_batches: int | None = None) -> list[np.ndarray]:
    """Deterministic batches of one domain's rows, in stored order: int32 [B, T1] each.

    Full batches of ``batch_size`` rows, at most ``max_batches`` of them (None = all); a domain
    with fewer than ``batch_size`` rows gives one smaller batch of all its rows.
    """
    if domain not in split.domains:
        raise DataError(f"unknown domain {domain!r}; the dataset's domains are {list(split.domains)}")
    if batch_size < 1:
        raise DataError(f"val_batches batch_size ({batch_size}) must be >= 1")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"val_batches max_batches ({max_batches}) must be >= 1 or None")
    rows_NT1 = split.tokens_NT1[split.domain_N == split.domains.index(domain)]
    if len(rows_NT1) < batch_size:
        return [rows_NT1]
    n = len(rows_NT1) // batch_size
    if max_batches is not None:
        n = min(n, max_batches)
    return [rows_NT1[i * batch_size : (i + 1) * batch_size] for i in range(n)]


def _take(rows: PackedRows, idx: np.ndarray) -> Split:
    tokens_NT1, domain_N = rows.tokens_NT1[idx], rows.domain_N[idx]
    tokens_NT1.flags.writeable = False
    domain_N.flags.writeable = False
    return Split(tokens_NT1=tokens_NT1, domain_N=domain_N, domains=rows.domains)


def _check_config(cfg: DataConfig) -> None:
    """The data fields this module relies on (RunConfig.validate checks most of them too)."""
    for name, value, lo in [
        ("data.seq_len", cfg.seq_len, 1),
        ("data.vocab_size", cfg.vocab_size, 260),
        ("data.seed", cfg.seed, 0),
    ]:
        if value < lo:
            raise DataError(f"{name} ({value}) must be >= {lo}")
    if not 0 < cfg.val_fraction < 0.5:
        raise DataError(f"data.val_fraction ({cfg.val_fraction}) must be in (0, 0.5)")
