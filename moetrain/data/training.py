"""What a training run reads: every ``data.source`` becomes a prepared corpus, then is streamed.

Owns: :func:`open_training_data` (config -> :class:`StreamingData`), the in-process preparation
of the ``builtin`` and ``paths`` sources into the cache (once; the same shard format and the same
packing step as ``moetrain prepare``, without Ray: these corpora are capped at
``data.max_bytes_per_domain``), and :class:`StreamingData` (this rank's micro-batches of each
step, validation batches, the exact cursor).

``data.source``: ``builtin`` / ``paths`` -> ``<cache>/data/prepared-<key>/`` keyed by (corpus
hash, tokenizer sha256, seq_len, format); ``prepared`` -> ``data.prepared_uri`` (local, s3://, gs://).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from moetrain.config import DataConfig, StoreConfig
from moetrain.data.cache import build_lock, cache_root, content_key
from moetrain.data.corpus import load_corpus
from moetrain.data.cursor import shard_global_batch
from moetrain.data.errors import DataError
from moetrain.data.shards import (
    FORMAT,
    MANIFEST,
    TOKENIZER,
    PreparedManifest,
    ShardInfo,
    make_manifest,
    pack_texts,
    read_manifest,
    shard_bytes,
    shard_id,
    shard_key,
)
from moetrain.data.store import open_data_store
from moetrain.data.stream import (
    DomainOrder,
    RowReader,
    StreamCursor,
    mixture_weights,
    num_val,
    train_to_global,
    val_stride,
)
from moetrain.data.tokenizer import build_tokenizer, eot_id, load_hf_tokenizer

SHARD_TEXT_BYTES = 16 << 20  # in-process preparation: text per shard (the builtin domains fit in one)


class StreamingData:
    """A prepared corpus as one rank trains on it (see :mod:`moetrain.data.stream`)."""

    def __init__(self, store, manifest: PreparedManifest, cfg: DataConfig, global_batch_size: int):
        self.manifest, self.domains = manifest, list(manifest.domains)
        self.vocab_size, self.eot_id, self.seq_len = manifest.vocab_size, manifest.eot_id, manifest.seq_len
        if manifest.seq_len != cfg.seq_len:
            raise DataError(
                f"data.seq_len ({cfg.seq_len}) differs from the prepared data's seq_len "
                f"({manifest.seq_len}) at {store.uri}"
            )
        self.k = val_stride(cfg.val_fraction)
        self.reader = RowReader(store, manifest)
        rows_D = np.array([self.reader.num_rows(d) for d in range(len(self.domains))])
        for name, n in zip(self.domains, rows_D):
            if n < 2:
                raise DataError(
                    f"domain {name!r} has {n} row(s) of seq_len+1 = {cfg.seq_len + 1} tokens; need at "
                    "least 2 (one train, one validation row): give it more text or lower data.seq_len"
                )
        self.val_rows_D = np.array([num_val(int(n), self.k) for n in rows_D])
        self.train_rows_D = rows_D - self.val_rows_D
        orders = [
            DomainOrder(d, [s.rows for s in manifest.shards if s.domain == d], self.k, cfg.seed) for d in self.domains
        ]
        w = mixture_weights(cfg, tuple(self.domains), self.train_rows_D)
        self.cursor = StreamCursor(orders, w, global_batch_size, cfg.seed)

    @property
    def shares_D(self) -> np.ndarray:
        """Each domain's expected share of a global batch (the mixture, normalised)."""
        return self.cursor.w_D / self.cursor.w_D.sum()

    def next_micro_batches(self, num_micro: int, world_size: int, rank: int, reorder=None) -> list[np.ndarray]:
        """This rank's micro-batches of the next step (int32 [b, T1] each); every rank must call it
        once per step. ``reorder(domain_B) -> perm_B`` changes which rank gets which row."""
        dom_B, t_B = self.cursor.next_batch()
        if reorder is not None:
            perm = reorder(dom_B)
            dom_B, t_B = dom_B[perm], t_B[perm]
        idx_B = np.arange(len(dom_B))
        mine = np.concatenate(shard_global_batch(idx_B, num_micro, world_size, rank))
        rows = self.reader.read(dom_B[mine], train_to_global(t_B[mine], self.k))
        return np.split(rows, num_micro)

    def val_batches(
        self, domain: str, batch_size: int, max_batches: int, world_size: int, rank: int
    ) -> list[np.ndarray]:
        """This rank's share of each validation batch of ``domain``: the first validation rows in
        order, ``batch_size`` per batch (one smaller batch if the domain has fewer), each cut to a
        multiple of ``world_size`` and split like a global batch."""
        d = self.domains.index(domain)
        n_val = int(self.val_rows_D[d])
        sizes = [n_val] if n_val < batch_size else [batch_size] * min(n_val // batch_size, max_batches)
        out, start = [], 0
        for size in sizes:
            rows = (size // world_size) * world_size
            if rows:
                g = (start + np.arange(rows)) * self.k  # validation row j is row j * k of the domain
                mine = shard_global_batch(g, 1, world_size, rank)[0]
                out.append(self.reader.read(np.full(len(mine), d), mine))
            start += size
        return out

    def first_train_rows(self, n: int) -> np.ndarray:
        """The first ``n`` training rows of the first domain, in stored order (tests, probes)."""
        return self.reader.read(np.zeros(n, dtype=np.int64), train_to_global(np.arange(n), self.k))


def open_training_data(cfg: DataConfig, global_batch_size: int, store_cfg: StoreConfig | None = None) -> StreamingData:
    """The streaming data a config names, preparing builtin / paths sources into the cache first;
    ``store_cfg`` (the ``storage`` section) opens ``data.prepared_uri`` and ``hf:`` tokenizers."""
    if cfg.source == "prepared":
        store = open_data_store(cfg.prepared_uri, store_cfg)
    else:
        store = open_data_store(str(prepare_local(cfg, store_cfg)), probe=False)
    return StreamingData(store, read_manifest(store), cfg, global_batch_size)


def resolve_tokenizer(
    cfg: DataConfig, corpus=None, corpus_hash: str = "", root: Path | None = None, store_cfg: StoreConfig | None = None
):
    """(tokenizer, sha256 of its JSON, eot id) for ``data.tokenizer``: ``bpe`` trains (or loads the
    cached) byte-level BPE on ``corpus``; ``hf:DIR`` loads ``DIR/tokenizer.json``."""
    if cfg.tokenizer == "bpe":
        if root is None:
            raise ValueError("data.tokenizer=bpe needs the folder of its cached tokenizer (root)")
        tok, sha, _ = build_tokenizer(corpus, corpus_hash, cfg.vocab_size, root)
        return tok, sha, eot_id(tok)
    return load_hf_tokenizer(cfg.tokenizer, store_cfg)  # eos from tokenizer_config.json / config.json


def prepare_local(cfg: DataConfig, store_cfg: StoreConfig | None = None) -> Path:
    """Prepare the builtin / paths corpus into ``<cache>/data/prepared-<key>/`` once (a
    directory renamed into place when complete; concurrent callers wait on a lock)."""
    root = cache_root(cfg)
    corpus = load_corpus(cfg)
    corpus_hash = corpus.content_hash()
    tok, tok_sha, eot = resolve_tokenizer(cfg, corpus, corpus_hash, root, store_cfg)
    key = content_key(
        {"corpus": corpus_hash, "tokenizer": tok_sha, "eot": eot, "seq_len": cfg.seq_len, "format": FORMAT}
    )
    final = root / f"prepared-{key[:24]}"
    if (final / MANIFEST).is_file():
        return final
    with build_lock(final):
        if (final / MANIFEST).is_file():
            return final
        tmp = root / f".prepared-{key[:24]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_local(tmp, corpus, tok, tok_sha, eot, cfg.seq_len)
            if final.exists():  # a leftover without a manifest
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp)
    return final


def _write_local(out: Path, corpus, tok, tok_sha: str, eot: int, seq_len: int) -> None:
    shards: list[ShardInfo] = []
    for name, docs in zip(corpus.domains, corpus.docs):
        for chunk in _chunks(list(docs), SHARD_TEXT_BYTES):
            rows_NT1, tokens = pack_texts(tok, chunk, eot, seq_len)
            info = ShardInfo(
                key=shard_key(name, shard_id(chunk, name, tok_sha, eot, seq_len)),
                domain=name,
                rows=len(rows_NT1),
                tokens=tokens,
                docs=len(chunk),
            )
            path = out / info.key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(shard_bytes(rows_NT1, name, tokens, len(chunk)))
            shards.append(info)
    manifest = make_manifest(
        shards, seq_len=seq_len, tokenizer_sha256=tok_sha, vocab_size=tok.get_vocab_size(), eot_id=eot
    )
    (out / TOKENIZER).write_text(tok.to_str())
    (out / MANIFEST).write_text(manifest.to_json())


def _chunks(docs: list[str], max_bytes: int) -> list[list[str]]:
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for doc in docs:
        n = len(doc.encode("utf-8"))
        if cur and size + n > max_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(doc)
        size += n
    if cur:
        out.append(cur)
    return out
