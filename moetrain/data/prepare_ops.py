"""The pure steps of ``moetrain prepare`` (no Ray): input listing, decoding, one batch -> shards.

Owns: expanding ``[domain=]PATH`` inputs (local paths, ``s3://`` / ``gs://`` URIs, directories,
globs) into files with their kind and domain; turning the bytes of a JSONL or text file, or a
batch of Parquet rows, into (domain, document) pairs with one-line errors naming the path, line
or row; and :func:`write_batch_shards` (documents -> one shard per domain, skipped when a shard
of the same content id exists). ``cluster/prepare.py`` maps these over the cluster with Ray Data.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moetrain.config import StoreConfig
from moetrain.data.errors import DataError
from moetrain.data.shards import ShardInfo, pack_texts, shard_bytes, shard_id, shard_info_from_footer, shard_key
from moetrain.data.store import open_data_store
from moetrain.storage import Store

_DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputFile:
    path: str  # path inside the store's filesystem (what Ray Data's include_paths reports)
    uri: str  # for messages
    kind: str  # parquet | jsonl | text
    domain: str  # "" = from data's domain column
    size: int


def file_kind(path: str) -> str:
    low = path.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "text"


def split_domain(entry: str) -> tuple[str, str]:
    """``"code=s3://b/x/*.py"`` -> ("code", "s3://b/x/*.py"); no ``name=`` prefix -> ("", entry)."""
    name, sep, rest = entry.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        if not _DOMAIN_NAME_RE.match(name):
            raise DataError(f"input {entry!r}: domain name {name!r} may only use letters, digits, '_', '.', '-'")
        return name, rest
    return "", entry


def expand_input(
    entry: str, *, domain_pattern: str = "", store_cfg: StoreConfig | None = None
) -> tuple[Store, list[InputFile]]:
    """(store, files) of one input: a file, a directory (recursive; hidden entries skipped) or a
    glob (``*``, ``?``, ``[...]`` in any path segment). The domain comes from the ``name=`` prefix,
    else ``domain_pattern`` (a regex whose first group, searched in the path, is the domain),
    else is left "" for the data's domain column."""
    domain, target = split_domain(entry)
    parts = target.split("/")
    first_glob = next((i for i, p in enumerate(parts) if set(p) & _GLOB_CHARS), None)
    base = "/".join(parts[:first_glob]) if first_glob is not None else target
    if "://" in target and base.endswith(":/"):
        base += "/"
    store = open_data_store(base or ".", store_cfg, probe=False)
    info = store.fs.get_file_info(store.root)
    if info.type == pafs.FileType.File:
        infos = [info]
    elif info.type == pafs.FileType.Directory:
        infos = [
            i
            for i in store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
            if i.type == pafs.FileType.File
        ]
        if first_glob is not None:
            pattern = store.root.rstrip("/") + "/" + "/".join(parts[first_glob:])
            infos = [i for i in infos if fnmatch.fnmatchcase(i.path, pattern)]
        infos = [i for i in infos if not any(seg.startswith(".") for seg in i.path[len(store.root) :].split("/"))]
    else:
        raise DataError(f"input {target!r} does not exist")
    if not infos:
        raise DataError(f"input {target!r} matches no file")
    files = []
    for i in sorted(infos, key=lambda i: i.path):
        uri = target if info.type == pafs.FileType.File else f"{store.uri}/{i.path[len(store.root) :].lstrip('/')}"
        files.append(
            InputFile(
                path=i.path,
                uri=uri,
                kind=file_kind(i.path),
                domain=domain or _domain_from_path(uri, domain_pattern),
                size=int(i.size or 0),
            )
        )
    return store, files


def _domain_from_path(uri: str, pattern: str) -> str:
    if not pattern:
        return ""
    m = re.search(pattern, uri)
    if m is None or not m.groups():
        raise DataError(f"{uri}: --domain-pattern {pattern!r} does not match this path (or has no group)")
    name = m.group(1) or ""
    if not name:
        raise DataError(f"{uri}: --domain-pattern {pattern!r} gives an empty domain")
    if not _DOMAIN_NAME_RE.match(name):
        raise DataError(f"{uri}: domain {name!r} from --domain-pattern may only use letters, digits, '_', '.', '-'")
    return name


def check_parquet(fs, f: InputFile, text_column: str, domain_column: str) -> None:
    """Footer-only check on the driver: readable, has a string text column (and domain column)."""
    try:
        schema = pq.ParquetFile(fs.open_input_file(f.path)).schema_arrow
    except Exception as exc:  # ArrowInvalid, OSError
        raise DataError(f"{f.uri}: unreadable Parquet shard: {exc}") from None
    for col, what in ((text_column, "text column (--text-column)"), (domain_column, "domain column (--domain-column)")):
        if col and col not in schema.names:
            raise DataError(f"{f.uri}: no {what} {col!r}; columns: {schema.names}")
    import pyarrow as pa

    t = schema.field(text_column).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"{f.uri}: text column {text_column!r} has type {t}, expected string")


def docs_from_bytes(
    data: bytes, uri: str, kind: str, text_field: str, domain: str, domain_field: str
) -> list[tuple[str, str]]:
    """(domain, text) pairs of one whole JSONL or text file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{uri} line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if kind == "text":
        return [(need_domain(domain, uri, ""), text)] if text else []
    out = []
    for lineno, raw in enumerate(io.StringIO(text), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{uri} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or text_field not in rec:
            raise DataError(f"{uri} line {lineno}: no text field {text_field!r} (--text-column)")
        value = rec[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{uri} line {lineno}: field {text_field!r} is {type(value).__name__}, expected a string")
        d = domain or (rec.get(domain_field) if domain_field else "")  # the file's own domain wins
        out.append((need_domain(d, uri, f" line {lineno}", domain_field), value))
    return out


def need_domain(domain, uri: str, where: str, field: str = "") -> str:
    if not isinstance(domain, str) or not domain.strip():
        src = f"domain field {field!r} is empty or missing" if field else "no domain"
        raise DataError(f"{uri}{where}: {src} (give domain=PATH, --domain-pattern or --domain-column)")
    if not _DOMAIN_NAME_RE.match(domain):
        raise DataError(f"{uri}{where}: domain {domain!r} may only use letters, digits, '_', '.', '-'")
    return domain


def write_batch_shards(
    pairs: list[tuple[str, str, str]], tok, tok_sha: str, eot: int, seq_len: int, store
) -> list[tuple[ShardInfo, bool]]:
    """``(source uri, domain, text)`` triples -> one shard per domain under ``store``; a shard whose
    content id already exists is not rebuilt (its footer is read). Returns (info, skipped)."""
    by_domain: dict[str, list[tuple[str, str]]] = {}
    for src, domain, text in pairs:
        by_domain.setdefault(domain, []).append((src, text))
    out = []
    for domain, items in sorted(by_domain.items()):
        texts = [t for _, t in items]
        ident = shard_id([f"{s}\0{t}" for s, t in items], domain, tok_sha, eot, seq_len)
        key = shard_key(domain, ident)
        if store.exists(key):
            with store.fs.open_input_file(store.path(key)) as fh:
                meta = pq.ParquetFile(fh).schema_arrow.metadata
            out.append((shard_info_from_footer(key, meta, store.uri_of(key)), True))
            continue
        rows_NT1, tokens = pack_texts(tok, texts, eot, seq_len)
        blob = shard_bytes(rows_NT1, domain, tokens, len(texts))
        store.write_atomic(key, lambda sink, blob=blob: sink.write(blob))
        out.append((ShardInfo(key=key, domain=domain, rows=len(rows_NT1), tokens=tokens, docs=len(texts)), False))
    return out
