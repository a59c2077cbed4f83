"""``moetrain prepare``: tokenize and pack a corpus into token shards with Ray Data.

    moetrain prepare code=s3://bucket/code/*.parquet english=docs/ --out s3://bucket/prepared \\
        --s3-endpoint http://127.0.0.1:9000 --tokenizer bpe --seq-len 128

Owns: the distributed pipeline. Inputs are listed and checked on the driver (globs expanded,
Parquet footers read: an unreadable file or a missing text column fails here, naming the path);
the tokenizer is trained on a sample (``bpe``) or loaded (``hf:DIR``) and stored beside the
shards; then Ray Data reads the files (``read_parquet`` for Parquet, ``read_binary_files`` for
JSONL and plain text) and ``map_batches`` runs :func:`_process` on the cluster's CPUs: decode,
tokenize, pack and write one shard per (batch, domain) straight to the store. The driver only
sees one small record per shard, so its memory does not grow with the corpus; the workers hold
one batch (a Parquet batch of ``batch_docs`` rows, or ``FILES_PER_BATCH`` whole JSONL / text
files) at a time. The manifest is written last.

Idempotent: a shard's key is a content id of its documents and their source paths, and the
pipeline keeps input order (``preserve_order``), so a re-run forms the same batches, finds the
shards already written and only reads their footers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
from tokenizers import Tokenizer

from moetrain.config import DataConfig, StoreConfig
from moetrain.data.corpus import Corpus
from moetrain.data.errors import DataError
from moetrain.data.prepare_ops import (
    InputFile,
    check_parquet,
    docs_from_bytes,
    expand_input,
    need_domain,
    write_batch_shards,
)
from moetrain.data.shards import MANIFEST, TOKENIZER, PreparedManifest, make_manifest
from moetrain.data.store import open_data_store
from moetrain.storage import Store
from moetrain.data.tokenizer import TRAIN_BYTES_TOTAL, eot_id, train_tokenizer

log = logging.getLogger("moetrain")

BATCH_DOCS = 2048  # Parquet rows per map_batches call (one shard per domain per call)
FILES_PER_BATCH = 64  # whole JSONL / text files per map_batches call
RSS_SAMPLE_S = 0.05  # measure_prepare: how often the process tree's memory is sampled
# Ray Data (2.60) reads every Parquet footer on a pool of FooterReader actors, 32 by default: each
# is a worker process of ~190 MB, so listing the files cost up to 6 GB for a moment, and how many
# had started when the peak was sampled made prepare's peak memory jump by hundreds of MB from run
# to run (10x corpus: 2,514-3,219 MB). Footer reads are I/O with 128 threads per actor: two do.
FOOTER_READERS = 2
FOOTER_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_STATS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("domain", pa.string()),
        ("rows", pa.int64()),
        ("tokens", pa.int64()),
        ("docs", pa.int64()),
        ("skipped", pa.bool_()),
        ("rss_mb", pa.float64()),
    ]
)


@contextlib.contextmanager
def footer_readers_env():
    """``FOOTER_ENV`` at ``FOOTER_READERS`` in this process (unless the user set it) while a
    Parquet read is built: the pool's size is read from the environment there, then travels with
    the read to the task that lists the files. Restored after."""
    old = os.environ.get(FOOTER_ENV)
    os.environ[FOOTER_ENV] = old or str(FOOTER_READERS)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FOOTER_ENV, None)


@dataclass(frozen=True)
class PrepareOptions:
    inputs: tuple[str, ...]  # "[domain=]PATH|URI|GLOB"
    out: str
    text_column: str = "text"
    domain_column: str = ""  # per-row domain (Parquet column / JSONL field)
    domain_pattern: str = ""  # regex; its first group, searched in each file's path, is the domain
    tokenizer: str = "bpe"  # bpe (trained on a sample of the inputs) | hf:DIR
    vocab_size: int = 2048
    seq_len: int = 128
    batch_docs: int = BATCH_DOCS
    store: StoreConfig = field(default_factory=StoreConfig)  # endpoints of the input and output stores
    progress: bool = True


@dataclass(frozen=True)
class PrepareResult:
    manifest: PreparedManifest
    uri: str
    shards_written: int
    shards_skipped: int
    seconds: float
    worker_peak_rss_mb: float  # the largest peak RSS of a worker process that ran a batch

    def summary(self) -> dict:
        rows = sum(s.rows for s in self.manifest.shards)
        return {
            "uri": self.uri,
            "shards": len(self.manifest.shards),
            "written": self.shards_written,
            "skipped": self.shards_skipped,
            "rows": rows,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(rows / max(self.seconds, 1e-9), 1),
            "tokens_per_domain": self.manifest.domain_totals("tokens"),
            "rows_per_domain": self.manifest.domain_totals("rows"),
            "tokenizer_sha256": self.manifest.tokenizer_sha256,
            "worker_peak_rss_mb": round(self.worker_peak_rss_mb, 1),
        }


def prepare(opts: PrepareOptions, connect=None) -> PrepareResult:
    """Run the pipeline. ``connect()`` is called once the inputs and the tokenizer are checked,
    before Ray Data starts (the CLI joins or starts Ray there); without it Ray must be up."""
    t0 = time.perf_counter()
    _check_options(opts)
    out = open_data_store(opts.out, opts.store)
    groups = _list_inputs(opts)
    tok, tok_json, tok_sha, eot = _tokenizer(opts, groups)
    out.write_bytes(TOKENIZER, tok_json.encode("utf-8"))
    if connect is not None:
        connect()
    _configure_ray_data()
    stats = _pipeline(opts, groups, tok_json=tok_json, tok_sha=tok_sha, eot=eot)
    infos, written, skipped, rss = _collect(stats, opts.progress)
    _check_domains_not_empty(groups, infos, opts.seq_len)
    manifest = make_manifest(
        infos, seq_len=opts.seq_len, tokenizer_sha256=tok_sha, vocab_size=tok.get_vocab_size(), eot_id=eot
    )
    out.write_bytes(MANIFEST, manifest.to_json().encode("utf-8"))  # the commit
    return PrepareResult(
        manifest=manifest,
        uri=out.uri,
        shards_written=written,
        shards_skipped=skipped,
        seconds=time.perf_counter() - t0,
        worker_peak_rss_mb=rss,
    )


def _check_options(opts: PrepareOptions) -> None:
    if opts.seq_len < 1 or opts.vocab_size < 260 or opts.batch_docs < 1:
        raise DataError(
            f"--seq-len ({opts.seq_len}) must be >= 1, --vocab-size ({opts.vocab_size}) >= 260, "
            f"--batch-docs ({opts.batch_docs}) >= 1"
        )


def _configure_ray_data() -> None:
    """Ray Data settings of this process's pipeline: input order kept, quiet."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same batches on a re-run: same shard ids
    ctx.enable_progress_bars = False  # ours counts shards and rows
    ctx.log_internal_stack_trace = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # a failure is reported as one line below


def _pipeline(opts: PrepareOptions, groups, *, tok_json: str, tok_sha: str, eot: int):
    """The lazy Ray Data pipeline: every input file read (Parquet batches of ``batch_docs`` rows,
    whole JSONL / text files ``FILES_PER_BATCH`` at a time) and mapped by :func:`_process`; one
    stats record (``_STATS_SCHEMA``) per shard written."""
    import ray.data

    common = dict(
        text_column=opts.text_column,
        domain_column=opts.domain_column,
        tok_json=tok_json,
        tok_sha=tok_sha,
        eot=eot,
        seq_len=opts.seq_len,
        out_uri=opts.out,
        store=opts.store,
    )
    parts = []
    for store, files in groups:
        by_path = {f.path: (f.uri, f.domain) for f in files}
        pq_files = [f.path for f in files if f.kind == "parquet"]
        other = [f.path for f in files if f.kind != "parquet"]
        cols = [opts.text_column] + ([opts.domain_column] if opts.domain_column else [])
        if pq_files:
            with footer_readers_env():  # Ray Data sizes the pool when it builds the read: here
                ds = ray.data.read_parquet(pq_files, filesystem=store.fs, columns=cols, include_paths=True)
            parts.append(
                ds.map_batches(
                    _process,  # type: ignore[arg-type]  # fn_kwargs
                    batch_size=opts.batch_docs,
                    batch_format="pyarrow",
                    fn_kwargs={**common, "by_path": by_path},
                )
            )
        if other:
            # blocks of <= FILES_PER_BATCH files: a worker's memory does not grow with the file count
            ds = ray.data.read_binary_files(
                other, filesystem=store.fs, include_paths=True, override_num_blocks=-(-len(other) // FILES_PER_BATCH)
            )
            parts.append(
                ds.map_batches(
                    _process,  # type: ignore[arg-type]  # fn_kwargs
                    batch_size=FILES_PER_BATCH,
                    batch_format="pyarrow",
                    fn_kwargs={**common, "by_path": by_path},
                )
            )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _check_domains_not_empty(groups, infos, seq_len: int) -> None:
    """Every domain an input declared got at least one row."""
    declared = {f.domain for _, files in groups for f in files if f.domain}
    empty = sorted(declared - {i.domain for i in infos if i.rows > 0})
    if empty:
        raise DataError(
            f"domain {empty[0]!r} is empty: its inputs hold no text that packs into a row of "
            f"seq_len+1 = {seq_len + 1} tokens"
        )


def _list_inputs(opts: PrepareOptions) -> list[tuple[Store, list[InputFile]]]:
    if not opts.inputs:
        raise DataError("moetrain prepare needs at least one input ([domain=]PATH, URI or glob)")
    groups = []
    for entry in opts.inputs:
        store, files = expand_input(entry, domain_pattern=opts.domain_pattern, store_cfg=opts.store)
        for f in files:
            if not f.domain and (not opts.domain_column or f.kind == "text"):
                raise DataError(
                    f"{f.uri}: no domain (give domain=PATH, --domain-pattern, or --domain-column for Parquet / JSONL)"
                )
            if f.kind == "parquet":
                check_parquet(store.fs, f, opts.text_column, opts.domain_column)
        groups.append((store, files))
    return groups


def _tokenizer(opts: PrepareOptions, groups) -> tuple[Tokenizer, str, str, int]:
    """(tokenizer, its JSON, sha256 of the JSON, eot id)."""
    import hashlib

    if opts.tokenizer != "bpe":
        from moetrain.data.training import resolve_tokenizer

        tok, _, eot = resolve_tokenizer(DataConfig(tokenizer=opts.tokenizer), store_cfg=opts.store)
    else:
        tok = train_tokenizer(_sample_corpus(opts, groups), opts.vocab_size)
        eot = eot_id(tok)
    text = tok.to_str()
    return tok, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), eot


def _sample_corpus(opts: PrepareOptions, groups) -> Corpus:
    """The BPE's training text: the first TRAIN_BYTES_TOTAL / len(inputs) bytes of each input."""
    import pyarrow.parquet as pq

    share = TRAIN_BYTES_TOTAL // len(groups)
    docs_per_input = []
    for store, files in groups:
        docs, left = [], share
        for f in files:
            if left <= 0:
                break
            if f.kind == "parquet":
                pf = pq.ParquetFile(store.fs.open_input_file(f.path))
                for batch in pf.iter_batches(batch_size=256, columns=[opts.text_column]):
                    texts = [t for t in batch.column(0).to_pylist() if t]
                    docs += texts
                    left -= sum(len(t) for t in texts)
                    if left <= 0:
                        break
            else:
                with store.fs.open_input_stream(f.path) as fh:
                    raw = fh.read(left)
                docs.append(raw.decode("utf-8", errors="ignore"))
                left -= len(raw)
        docs_per_input.append(tuple(docs))
    return Corpus(domains=tuple(f"input-{i}" for i in range(len(groups))), docs=tuple(docs_per_input))


def _collect(stats, progress: bool):
    """Stream the per-shard records to the driver (progress bar); DataError from any worker."""
    from tqdm import tqdm

    from moetrain.data.shards import ShardInfo

    infos, written, skipped, rss = [], 0, 0, 0.0
    bar = tqdm(desc="prepare", unit=" shard", disable=not progress, file=sys.stderr)
    try:
        for row in stats.iter_rows():
            infos.append(
                ShardInfo(
                    key=row["key"],
                    domain=row["domain"],
                    rows=int(row["rows"]),
                    tokens=int(row["tokens"]),
                    docs=int(row["docs"]),
                )
            )
            skipped += bool(row["skipped"])
            written += not row["skipped"]
            rss = max(rss, float(row["rss_mb"]))
            bar.set_postfix(rows=sum(i.rows for i in infos), skipped=skipped, refresh=False)
            bar.update(1)
    except Exception as exc:
        raise DataError(_worker_error(exc)) from None
    finally:
        bar.close()
    return infos, written, skipped, rss


def _worker_error(exc: BaseException) -> str:
    """The one-line message of the DataError a worker raised (else the root error's last line)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DataError):
            return str(cur.args[0]) if cur.args else str(cur)
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    # Ray Data re-raises a UDF's exception as a UserCodeException holding its traceback as text
    found = re.findall(r"DataError: (.+)", str(exc))
    if found:
        return found[-1].strip()
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "DataContext" not in ln]
    return f"prepare failed: {lines[-1] if lines else type(exc).__name__}"


# ---- on the workers ----------------------------------------------------------------------
_CACHE: dict = {}


def _process(
    batch: pa.Table, *, by_path, text_column, domain_column, tok_json, tok_sha, eot, seq_len, out_uri, store
) -> pa.Table:
    """One batch -> shards in the store; returns one record per shard (see _STATS_SCHEMA)."""
    from tokenizers import Tokenizer

    if ("tok", tok_sha) not in _CACHE:
        tok = Tokenizer.from_str(tok_json)
        tok.encode_special_tokens = True
        _CACHE[("tok", tok_sha)] = tok
    if ("store", out_uri) not in _CACHE:
        _CACHE[("store", out_uri)] = open_data_store(out_uri, store, probe=False)
    tok, store = _CACHE[("tok", tok_sha)], _CACHE[("store", out_uri)]
    pairs = []
    paths = batch.column("path").to_pylist()
    if "bytes" in batch.column_names:  # read_binary_files: whole JSONL / text files
        for data, path in zip(batch.column("bytes").to_pylist(), paths):
            uri, domain = by_path[path]
            kind = "jsonl" if uri.lower().endswith((".jsonl", ".json", ".ndjson")) else "text"
            pairs += [(uri, d, t) for d, t in docs_from_bytes(data, uri, kind, text_column, domain, domain_column)]
    else:
        try:
            texts = batch.column(text_column).to_pylist()
        except UnicodeDecodeError as exc:
            where = by_path[paths[0]][0]
            raise DataError(f"{where}: column {text_column!r} holds non-UTF-8 text ({exc.reason})") from None
        doms = batch.column(domain_column).to_pylist() if domain_column else [None] * len(texts)
        for text, path, dom in zip(texts, paths, doms):
            uri, domain = by_path[path]
            if text:
                pairs.append((uri, need_domain(domain or dom, uri, f" (document {text[:30]!r})", domain_column), text))
    results = write_batch_shards(pairs, tok, tok_sha, eot, seq_len, store)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        {
            "key": i.key,
            "domain": i.domain,
            "rows": i.rows,
            "tokens": i.tokens,
            "docs": i.docs,
            "skipped": s,
            "rss_mb": rss_mb,
        }
        for i, s in results
    ]
    return pa.Table.from_pylist(rows, schema=_STATS_SCHEMA)


# ---- measuring -----------------------------------------------------------------------------
def measure_prepare(argv: list[str], *, env: dict | None = None, timeout_s: float = 1800) -> dict:
    """Run ``moetrain prepare ARGV --json`` in a fresh process (its own local Ray) and sample the
    resident memory of its whole process tree (driver, Ray's own processes, the workers) every
    RSS_SAMPLE_S s. Returns the prepare summary plus ``peak_rss_mb`` (the largest sum over the
    tree) and ``wall_s``. For scripts/bench/bench_domain.py and docs/data.md."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "prepare", *argv, "--json", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    peak = 0.0
    root = psutil.Process(proc.pid)
    while proc.poll() is None and time.perf_counter() - t0 < timeout_s:
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total / 2**20)
        time.sleep(RSS_SAMPLE_S)
    stdout, stderr = proc.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
    if proc.returncode != 0:
        raise RuntimeError(f"moetrain prepare exited {proc.returncode}: {stderr.strip().splitlines()[-1:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {**summary, "peak_rss_mb": round(peak, 1), "wall_s": round(time.perf_counter() - t0, 2)}
