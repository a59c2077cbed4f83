"""Throughput and peak memory of ``moetrain prepare`` on 1x and Nx the same corpus.

    python scripts/bench/bench_prepare.py --copies 10 --num-cpus 2

The 1x corpus is written from files every CPython install has: the standard library's ``*.py``
sources as plain-text files (domain ``code``, from the path), the pydoc topics as JSONL (domain
``english``) and as Parquet with a domain column (``manual``), up to ``--bytes-per-domain`` each.
The Nx corpus is N copies under different paths (different shard ids: nothing is skipped). Each
size is prepared in a fresh process with its own local Ray; ``cluster.prepare.measure_prepare``
samples the resident memory of the whole process tree. Prints one JSON line with
``prepare_rows_per_s`` (the Nx run), ``prepare_peak_rss_mb_1x``, ``prepare_peak_rss_mb_<N>x`` and
their ratio. ``build_corpus`` and ``measure_prepare`` are what scripts/bench/bench_domain.py reuses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.prepare import measure_prepare  # noqa: E402
from scripts.bench import results  # noqa: E402

SCHEMA = results.Schema(
    "prepare", "moetrain prepare on Ray Data: peak RSS of the process tree, 10x the corpus vs 1x",
    targets=(results.Target("peak_rss_ratio", "<=", 1.2, "x", "peak RSS of the process tree, 10x corpus / 1x"),),
    keys=("prepare_rows_per_s", "prepare_rows_per_s_1x", "prepare_peak_rss_mb_1x", "worker_peak_rss_mb_1x",
          "rows_1x", "seconds_1x"))


def build_corpus(root: Path, copies: int = 1, bytes_per_domain: int = 1_000_000) -> list[str]:
    """Write ``copies`` copies of the sample corpus under ``root``; returns the prepare inputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moetrain.data.corpus import cap_docs, pydoc_topic_docs, stdlib_code_docs

    code = cap_docs(stdlib_code_docs(), bytes_per_domain)
    topics = cap_docs(pydoc_topic_docs(), bytes_per_domain)
    half = len(topics) // 2
    for c in range(copies):
        base = root / f"copy-{c:03d}"
        (base / "code").mkdir(parents=True, exist_ok=True)
        for i, doc in enumerate(code):
            (base / "code" / f"{i:05d}.py").write_text(doc)
        with open(base / "english.jsonl", "w") as f:
            for t in topics[:half]:
                f.write(json.dumps({"text": t}) + "\n")
        pq.write_table(pa.table({"text": topics[half:], "source": ["manual"] * (len(topics) - half)}),
                       base / "manual.parquet")
    return [f"{root}/copy-*/code/*.py", f"{root}/copy-*/english.jsonl", f"{root}/copy-*/manual.parquet"]


def run(copies: int, num_cpus: int, bytes_per_domain: int, workdir: Path, batch_docs: int = 0) -> dict:
    src, out = workdir / f"in-{copies}x", workdir / f"out-{copies}x"
    inputs = build_corpus(src, copies, bytes_per_domain)
    argv = [f"code={inputs[0]}", f"english={inputs[1]}", inputs[2], "--domain-column", "source",
            "--out", str(out), "--num-cpus", str(num_cpus)] + (["--batch-docs", str(batch_docs)] if batch_docs else [])
    return measure_prepare(argv)


def measure(copies: int = 10, num_cpus: int = 2, bytes_per_domain: int = 1_000_000, batch_docs: int = 0,
            workdir: str = "") -> dict:
    """``moetrain prepare`` on the corpus at 1x and ``copies`` x: rows/s and the process tree's
    peak RSS of each (the keys of scripts/bench/bench_domain.py's JSON line, plus details)."""
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        one = run(1, num_cpus, bytes_per_domain, work, batch_docs)
        many = run(copies, num_cpus, bytes_per_domain, work, batch_docs)
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
    return {"prepare_rows_per_s": many["rows_per_s"], "prepare_rows_per_s_1x": one["rows_per_s"],
            "prepare_peak_rss_mb_1x": one["peak_rss_mb"], f"prepare_peak_rss_mb_{copies}x": many["peak_rss_mb"],
            "peak_rss_ratio": round(many["peak_rss_mb"] / one["peak_rss_mb"], 3),
            "worker_peak_rss_mb_1x": one["worker_peak_rss_mb"],
            f"worker_peak_rss_mb_{copies}x": many["worker_peak_rss_mb"],
            "rows_1x": one["rows"], f"rows_{copies}x": many["rows"],
            "seconds_1x": one["seconds"], f"seconds_{copies}x": many["seconds"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--bytes-per-domain", type=int, default=1_000_000)
    p.add_argument("--workdir", default="")
    p.add_argument("--batch-docs", type=int, default=0, help="Parquet rows per batch (0: prepare's default)")
    results.add_flag(p)
    args = p.parse_args(argv)
    line = measure(args.copies, args.num_cpus, args.bytes_per_domain, args.batch_docs, args.workdir)
    print(json.dumps(line))
    results.record(SCHEMA, line, args)
    return line


if __name__ == "__main__":
    main()
