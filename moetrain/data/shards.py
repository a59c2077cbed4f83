"""The prepared-corpus format: Parquet token shards plus a manifest, on any ``pyarrow.fs`` store.

Owns: the layout written by ``moetrain prepare`` (and by the in-process preparation of the
``builtin`` / ``paths`` sources), the pure per-batch step (documents -> packed rows -> one shard),
the manifest (its fields, writing it last, reading and checking it). Stores are opened by
:mod:`moetrain.data.store`.

Layout under the output URI (a local path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``)::

    tokenizer.json                   the tokenizer every shard was encoded with
    shards/<domain>/<id>.parquet     column ``tokens``: fixed_size_list<int32>[seq_len + 1];
                                     row groups of ROW_GROUP_ROWS rows; key-value metadata
                                     moetrain.rows / .tokens / .docs / .domain
    manifest.json                    written last: the commit (format, seq_len, tokenizer sha256,
                                     vocab size, eot id, per domain rows / tokens / docs, shards)

A shard's ``<id>`` is a content hash of the documents it was made from (and of the tokenizer and
``seq_len``), so a re-run finds the shards it already wrote and skips them. Shards are written to
a temporary key and moved into place: a shard that exists is complete. Each shard packs its own
documents (the tail shorter than a row is dropped), so shards are independent of each other.

Shapes: ``N`` rows, ``T1`` = ``seq_len + 1`` tokens per row.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moetrain.data.errors import DataError
from moetrain.data.packing import pack_stream
from moetrain.data.tokenizer import encode_docs
from moetrain.storage import StoreError

FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
ROW_GROUP_ROWS = 256  # the unit a training rank reads: 256 x 129 int32 = 132 KB at seq_len 128


@dataclass(frozen=True)
class ShardInfo:
    key: str  # below the prepared root, e.g. "shards/code/3fa2...parquet"
    domain: str
    rows: int
    tokens: int  # tokens of the documents (eot included) before the tail was dropped
    docs: int


@dataclass(frozen=True)
class PreparedManifest:
    seq_len: int
    tokenizer_sha256: str
    vocab_size: int
    eot_id: int
    domains: tuple[str, ...]
    shards: tuple[ShardInfo, ...]  # grouped by domain, in ``domains`` order, then in input order

    def domain_totals(self, field: str) -> dict[str, int]:
        """Per domain sum of a ShardInfo field (``rows``, ``tokens`` or ``docs``)."""
        out = {d: 0 for d in self.domains}
        for s in self.shards:
            out[s.domain] += getattr(s, field)
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "seq_len": self.seq_len,
                "tokenizer": {"sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size, "eot_id": self.eot_id},
                "domains": {
                    d: {
                        "rows": self.domain_totals("rows")[d],
                        "tokens": self.domain_totals("tokens")[d],
                        "docs": self.domain_totals("docs")[d],
                    }
                    for d in self.domains
                },
                "shards": [vars(s) for s in self.shards],
            },
            indent=1,
        )


def make_manifest(
    shards: list[ShardInfo], *, seq_len: int, tokenizer_sha256: str, vocab_size: int, eot_id: int
) -> PreparedManifest:
    """Group the shards by domain (sorted names), keeping their order within a domain (the input
    order: a training stream is then the same wherever the same inputs were prepared), and refuse
    a domain that packed no row."""
    domains = tuple(sorted({s.domain for s in shards}))
    ordered = tuple(sorted(shards, key=lambda s: s.domain))  # stable
    m = PreparedManifest(
        seq_len=seq_len,
        tokenizer_sha256=tokenizer_sha256,
        vocab_size=vocab_size,
        eot_id=eot_id,
        domains=domains,
        shards=ordered,
    )
    for d, rows in m.domain_totals("rows").items():
        if rows == 0:
            raise DataError(
                f"domain {d!r} packs into no row of data.seq_len+1 = {seq_len + 1} tokens: "
                "give it more text or lower seq_len"
            )
    return m


def parse_manifest(text: str, where: str) -> PreparedManifest:
    """A manifest from its JSON; errors name ``where`` (the manifest's URI)."""
    try:
        raw = json.loads(text)
        tok = raw["tokenizer"]
        shards = tuple(ShardInfo(**s) for s in raw["shards"])
        m = PreparedManifest(
            seq_len=int(raw["seq_len"]),
            tokenizer_sha256=str(tok["sha256"]),
            vocab_size=int(tok["vocab_size"]),
            eot_id=int(tok["eot_id"]),
            domains=tuple(raw["domains"]),
            shards=shards,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where} is not a moetrain prepared manifest: {exc!r}") from None
    if raw.get("format") != FORMAT:
        raise DataError(f"{where} has format {raw.get('format')!r}; this moetrain reads format {FORMAT}")
    return m


def shard_id(texts: list[str], domain: str, tokenizer_sha256: str, eot: int, seq_len: int) -> str:
    """Content id of the shard made from ``texts``: equal inputs (the end-of-text id that separates
    the documents included) give the same key on a re-run."""
    h = hashlib.sha256(f"moetrain-shard-v{FORMAT}|{domain}|{tokenizer_sha256}|{eot}|{seq_len}".encode())
    for t in texts:
        raw = t.encode("utf-8", errors="surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(zlib.crc32(raw).to_bytes(4, "little"))
        h.update(raw[:64])
    return h.hexdigest()[:24]


def shard_key(domain: str, ident: str) -> str:
    return f"shards/{domain}/{ident}.parquet"


def encode(tok, texts: list[str]) -> list[np.ndarray]:
    """The one place this module calls the tokenizer: token ids per document (int32)."""
    return encode_docs(tok, texts)


def pack_texts(tok, texts: list[str], eot: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Documents -> (rows int32 [N, seq_len + 1], tokens incl. one eot per document)."""
    ids = encode(tok, texts)
    return pack_stream(ids, eot, seq_len), int(sum(len(x) + 1 for x in ids))


def shard_bytes(rows_NT1: np.ndarray, domain: str, tokens: int, docs: int) -> bytes:
    """One shard as Parquet bytes (zstd; row groups of ROW_GROUP_ROWS)."""
    T1 = rows_NT1.shape[1]
    col = pa.FixedSizeListArray.from_arrays(pa.array(rows_NT1.reshape(-1).astype(np.int32, copy=False)), T1)
    meta = {
        "moetrain.rows": str(len(rows_NT1)),
        "moetrain.tokens": str(tokens),
        "moetrain.docs": str(docs),
        "moetrain.domain": domain,
    }
    table = pa.table({"tokens": col}).replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def shard_info_from_footer(key: str, metadata: dict[bytes, bytes] | None, where: str) -> ShardInfo:
    """The ShardInfo recorded in a shard's key-value metadata (a re-run reads only the footer)."""
    meta = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
    try:
        return ShardInfo(
            key=key,
            domain=meta["moetrain.domain"],
            rows=int(meta["moetrain.rows"]),
            tokens=int(meta["moetrain.tokens"]),
            docs=int(meta["moetrain.docs"]),
        )
    except (KeyError, ValueError):
        raise DataError(f"shard {where} has no moetrain metadata: not written by moetrain prepare") from None


def read_manifest(store) -> PreparedManifest:
    """The committed manifest of a prepared root (DataError naming the URI when absent)."""
    where = store.uri_of(MANIFEST)
    try:
        if not store.exists(MANIFEST):
            raise DataError(f"{where} does not exist: run `moetrain prepare` to this URI first (or it did not finish)")
        return parse_manifest(store.read_bytes(MANIFEST).decode("utf-8"), where)
    except StoreError as exc:
        raise DataError(f"cannot read {where}: {exc}") from None
