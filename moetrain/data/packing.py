"""Packing token streams into fixed-length rows, the Parquet row store, and the train/val split.

Owns: documents -> ``[doc ids, <|endoftext|>, doc ids, <|endoftext|>, ...]`` per domain -> rows
of ``seq_len + 1`` tokens (non-overlapping; a row's inputs are ``row[:-1]``, its targets
``row[1:]``; the tail shorter than a row is dropped), the domain label of every row, storing /
loading the rows as Parquet, and the deterministic per-domain train/validation split.

Shapes: ``N`` rows, ``T1`` = ``seq_len + 1`` tokens per row.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moetrain.data.corpus import Corpus
from moetrain.data.errors import DataError
from moetrain.data.tokenizer import encode_docs

PACK_FORMAT = 1


@dataclass(frozen=True)
class PackedRows:
    """All packed rows of a corpus, domains in corpus order, before the split."""

    tokens_NT1: np.ndarray  # int32 [N, seq_len + 1]
    domain_N: np.ndarray  # int16 [N], index into `domains`
    domains: tuple[str, ...]
    stats: dict[str, dict[str, int]]  # per domain: docs, bytes, tokens, rows


def pack_stream(ids_per_doc: list[np.ndarray], eot: int, seq_len: int) -> np.ndarray:
    """Concatenate documents, each followed by ``eot``, and cut into rows: int32 [N, seq_len+1]."""
    eot_1 = np.array([eot], dtype=np.int32)
    stream = (
        np.concatenate([part for ids in ids_per_doc for part in (ids, eot_1)])
        if ids_per_doc
        else np.zeros(0, dtype=np.int32)
    )
    n_rows = len(stream) // (seq_len + 1)
    return stream[: n_rows * (seq_len + 1)].reshape(n_rows, seq_len + 1).astype(np.int32, copy=False)


def pack_corpus(tok, corpus: Corpus, eot: int, seq_len: int) -> PackedRows:
    """Tokenize and pack every domain of ``corpus``; rows grouped by domain in corpus order."""
    blocks, labels, stats = [], [], {}
    for d, (name, docs) in enumerate(zip(corpus.domains, corpus.docs)):
        ids = encode_docs(tok, docs)
        rows_NT1 = pack_stream(ids, eot, seq_len)
        blocks.append(rows_NT1)
        labels.append(np.full(len(rows_NT1), d, dtype=np.int16))
        stats[name] = {
            "docs": len(docs),
            "bytes": sum(len(doc.encode("utf-8")) for doc in docs),
            "tokens": int(sum(len(x) + 1 for x in ids)),
            "rows": len(rows_NT1),
        }
    return PackedRows(np.concatenate(blocks), np.concatenate(labels), corpus.domains, stats)


def write_packed(path: Path, rows: PackedRows) -> None:
    """Write rows as Parquet: ``tokens`` fixed_size_list<int32>[T1], ``domain`` int16."""
    T1 = rows.tokens_NT1.shape[1]
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.tokens_NT1.reshape(-1)), T1)
    meta = {
        "moetrain.pack_format": str(PACK_FORMAT),
        "moetrain.domains": json.dumps(list(rows.domains)),
        "moetrain.stats": json.dumps(rows.stats),
    }
    table = pa.table({"tokens": tokens, "domain": pa.array(rows.domain_N)}).replace_schema_metadata(meta)
    pq.write_table(table, str(path), compression="zstd")


def read_packed(path: Path) -> PackedRows:
    """Load rows written by :func:`write_packed`."""
    table = pq.read_table(str(path))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    tokens = table.column("tokens").combine_chunks()
    T1 = tokens.type.list_size
    tokens_NT1 = tokens.flatten().to_numpy().astype(np.int32, copy=False).reshape(-1, T1)
    domain_N = table.column("domain").to_numpy().astype(np.int16, copy=False)
    return PackedRows(
        tokens_NT1, domain_N, tuple(json.loads(meta["moetrain.domains"])), json.loads(meta["moetrain.stats"])
    )


def split_rows(
    domain_N: np.ndarray, domains: tuple[str, ...], val_fraction: float, seed: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (sorted) of the train and validation splits.

    Per domain with ``n`` rows: ``max(1, round(n * val_fraction))`` rows, drawn by a generator
    seeded with ``(seed, crc32(domain name))`` (so adding a domain leaves the others' splits
    alone), go to validation. Raises :class:`DataError` if a domain cannot give one of each.
    """
    train, val = [], []
    for d, name in enumerate(domains):
        idx = np.flatnonzero(domain_N == d)
        n_val = max(1, round(len(idx) * val_fraction))
        if len(idx) - n_val < 1:
            raise DataError(
                f"domain {name!r} packs into only {len(idx)} row(s) of data.seq_len+1 = "
                f"{seq_len + 1} tokens; need at least 2 (one train, one validation row): "
                "give it more text or lower data.seq_len"
            )
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        is_val = np.zeros(len(idx), dtype=bool)
        is_val[rng.choice(len(idx), size=n_val, replace=False)] = True
        val.append(idx[is_val])
        train.append(idx[~is_val])
    return np.concatenate(train), np.concatenate(val)
