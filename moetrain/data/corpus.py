"""Raw text corpora: the bundled default corpus and user-given files.

Owns: turning a :class:`~moetrain.config.DataConfig` into a :class:`Corpus` (ordered domains,
each a list of document strings, capped at ``data.max_bytes_per_domain`` UTF-8 bytes), and the
corpus content hash that keys every cache entry downstream.

Sources:
- ``data.source: builtin`` - domain ``code``: the standard library's ``*.py`` files (sorted walk
  of ``sysconfig.get_paths()["stdlib"]``, skipping tests, site-packages, IDLE, demos and
  ``pydoc_data``); domain ``english``: the values of ``pydoc_data.topics.topics`` in sorted key
  order. No downloads.
- ``data.source: paths`` - ``data.paths: ["name=PATH", ...]``; PATH is a text file, a directory
  of text files (recursive, sorted, hidden entries skipped), a ``.jsonl`` file (string field
  ``data.text_field`` per line) or a ``.parquet`` file (string column ``data.text_field``).

The cap is exact: whole documents are taken in order and the last one is cut (at a UTF-8
character boundary) so the domain holds at most ``max_bytes_per_domain`` bytes. It also bounds
what is *read*: a text file (alone or in a directory) is read only up to the bytes the domain
still has room for (plus at most 3 to finish a UTF-8 character), so a 1 GB file under a 4 MB cap
costs 4 MB of reading and memory. JSONL records and Parquet batches are read whole, one at a
time, until the cap is reached. Domains that take more than :data:`PROGRESS_AFTER_S` to read
are logged (bytes and seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from moetrain.config import DataConfig
from moetrain.data.errors import DataError

log = logging.getLogger("moetrain")

BUILTIN_DOMAINS = ("code", "english")
# Stdlib directories left out of the `code` domain: tests (some deliberately malformed),
# third-party packages, the IDE, demos, and pydoc_data (that text is the `english` domain).
_STDLIB_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "site-packages",
        "dist-packages",
        "idlelib",
        "turtledemo",
        "__pycache__",
        "pydoc_data",
    }
)
_DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
PROGRESS_AFTER_S = 2.0  # a domain slower than this to read is reported in the log
_UTF8_TAIL = 3  # bytes beyond a cut that may finish the UTF-8 character it splits


@dataclass(frozen=True)
class Corpus:
    """Ordered text domains. ``docs[i]`` are the documents of ``domains[i]``."""

    domains: tuple[str, ...]
    docs: tuple[tuple[str, ...], ...]

    def num_bytes(self, domain: str) -> int:
        return sum(len(d.encode("utf-8")) for d in self.docs[self.domains.index(domain)])

    def content_hash(self) -> str:
        """sha256 over domain names and every document (length-prefixed, so boundaries count)."""
        h = hashlib.sha256(b"moetrain-corpus-v1")
        for name, docs in zip(self.domains, self.docs):
            _update_framed(h, name.encode("utf-8"))
            h.update(len(docs).to_bytes(8, "little"))
            for doc in docs:
                _update_framed(h, doc.encode("utf-8"))
        return h.hexdigest()


def _update_framed(h: "hashlib._Hash", data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus a config names (builtin or ``data.paths``), each domain capped and non-empty."""
    if cfg.max_bytes_per_domain < 1:
        raise DataError(f"data.max_bytes_per_domain ({cfg.max_bytes_per_domain}) must be >= 1")
    if cfg.source == "builtin":
        sources = {"code": stdlib_code_docs(), "english": pydoc_topic_docs()}
    elif cfg.source == "paths":
        entries = parse_path_entries(cfg.paths)
        sources = {name: read_path_docs(path, cfg.text_field, cfg.max_bytes_per_domain) for name, path in entries}
    else:
        raise DataError(f"data.source ({cfg.source!r}) must be 'builtin' or 'paths'")
    domains, docs = [], []
    for name, stream in sources.items():
        t0 = time.perf_counter()
        capped = cap_docs(stream, cfg.max_bytes_per_domain)
        if not capped:
            raise DataError(f"domain {name!r} has no text (every document is empty)")
        seconds = time.perf_counter() - t0
        if seconds > PROGRESS_AFTER_S:
            log.info(
                "data: read domain %r: %.1f MB (cap %.1f MB) in %.1f s",
                name,
                sum(len(d.encode("utf-8")) for d in capped) / 1e6,
                cfg.max_bytes_per_domain / 1e6,
                seconds,
            )
        domains.append(name)
        docs.append(tuple(capped))
    return Corpus(domains=tuple(domains), docs=tuple(docs))


def cap_docs(docs: Iterator[str], max_bytes: int) -> list[str]:
    """Non-empty documents in order until ``max_bytes`` UTF-8 bytes; the last one is cut to fit.

    Stops pulling from ``docs`` once the cap is reached, so huge inputs are not read in full.
    """
    out: list[str] = []
    left = max_bytes
    for doc in docs:
        if not doc:
            continue
        raw = doc.encode("utf-8")
        if len(raw) >= left:
            cut = raw[:left].decode("utf-8", errors="ignore")
            if cut:
                out.append(cut)
            break
        out.append(doc)
        left -= len(raw)
    return out


# --------------------------------------------------------------------------------------------
# Builtin corpus
# --------------------------------------------------------------------------------------------


def stdlib_code_docs(root: str | None = None) -> Iterator[str]:
    """The stdlib's ``*.py`` sources in a sorted, deterministic walk (undecodable files skipped)."""
    root = root or sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-")))
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            try:
                yield Path(dirpath, fname).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue


def pydoc_topic_docs() -> Iterator[str]:
    """The English help texts of ``pydoc_data.topics``, in sorted key order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


# --------------------------------------------------------------------------------------------
# User paths
# --------------------------------------------------------------------------------------------


def parse_path_entries(entries: list[str]) -> list[tuple[str, Path]]:
    """``["name=PATH", ...]`` -> ``[(name, Path), ...]``; names unique and ``[A-Za-z0-9_.-]+``."""
    if not entries:
        raise DataError("data.paths is empty: give 'domain=PATH' entries")
    out: list[tuple[str, Path]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise DataError(f"data.paths entry {entry!r} must look like 'domain=PATH'")
        if not _DOMAIN_NAME_RE.match(name):
            raise DataError(
                f"data.paths entry {entry!r}: domain name {name!r} may only use letters, digits, '_', '.', '-'"
            )
        if any(name == seen for seen, _ in out):
            raise DataError(f"data.paths names domain {name!r} more than once")
        out.append((name, Path(path).expanduser()))
    return out


def read_path_docs(path: Path, text_field: str, max_bytes: int | None = None) -> Iterator[str]:
    """Documents of one user path. Checks existence and emptiness eagerly (before iteration).

    ``max_bytes``: the consumer's cap (:func:`cap_docs`); text files are then read only up to
    the room left under it (see the module doc), instead of whole."""
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"data path {str(path)!r} is an empty directory")
        return _text_files_docs(files, max_bytes)
    if path.stat().st_size == 0:
        raise DataError(f"data path {str(path)!r} is an empty file")
    if path.suffix == ".jsonl":
        return _jsonl_docs(path, text_field)
    if path.suffix == ".parquet":
        return _parquet_docs(path, text_field)
    return _text_files_docs([path], max_bytes)


def _text_files_docs(files: list[Path], max_bytes: int | None) -> Iterator[str]:
    """Each file's text, read up to the room ``max_bytes`` leaves after the texts before it."""
    left = max_bytes
    for path in files:
        text = _read_text_file(path, None if left is None else left + _UTF8_TAIL)
        yield text
        if left is not None and text:
            left -= len(text.encode("utf-8"))
            if left <= 0:
                return


def _read_text_file(path: Path, limit: int | None = None) -> str:
    """The file's text; with ``limit``, only its first ``limit`` bytes (a UTF-8 character cut
    at the end is dropped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read() if limit is None else f.read(limit)
            cut = limit is not None and len(raw) == limit and f.read(1) != b""
    except OSError as exc:
        raise DataError(f"data file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(raw) - _UTF8_TAIL and exc.reason == "unexpected end of data":
            return raw[: exc.start].decode("utf-8")
        raise DataError(f"data file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{str(path)!r} line {lineno}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{str(path)!r} line {lineno}: no field {text_field!r} (data.text_field)")
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{str(path)!r} line {lineno}: field {text_field!r} is {type(text).__name__}, expected a string"
                )
            yield text


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{str(path)!r} is not a readable Parquet file: {exc}") from None
    schema = pfile.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{str(path)!r} has no column {text_field!r} (data.text_field); columns: {schema.names}")
    ftype = schema.field(text_field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
        raise DataError(f"{str(path)!r} column {text_field!r} has type {ftype}, expected string")
    return _iter_parquet_column(pfile, text_field)


def _iter_parquet_column(pfile, text_field: str) -> Iterator[str]:
    for batch in pfile.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text
