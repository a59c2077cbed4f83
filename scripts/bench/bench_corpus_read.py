"""Benchmark: reading a huge text file as a training corpus is bounded by the data cap.

For each case (an ordinary 1 GB text file of short lines, and a 1 GB file that is one line
without whitespace) a fresh subprocess runs

- ``baseline``: read the whole file as text (what corpus reading did before the cap bounded it);
- ``moetrain``: the driver's in-process data preparation of ``data.source=paths`` with the
  default ``data.max_bytes_per_domain`` (read under the cap, train the byte-level BPE, pack and
  write the shards: :func:`moetrain.data.training.prepare_local`, what ``moetrain train`` runs
  first),

and reports its seconds and peak RSS (``ru_maxrss``). The files are generated in a temporary
folder on disk (``--dir``) and deleted after. Prints a table, then one JSON line with the CPU and
whether the targets are met (peak RSS under ``RSS_TARGET_MB`` and seconds under
``SECONDS_TARGET`` for both cases). ``--quick``: 64 MB files; the smoke test also lowers the cap.

    .venv/bin/python scripts/bench/bench_corpus_read.py [--quick] [--size-mb N] [--cap-bytes N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_TARGET_MB = 600.0  # peak RSS of the moetrain path, whatever the file size
SECONDS_TARGET = 120.0  # wall time of the moetrain path (cap read + tokenizer + packing)
CHUNK = 1 << 20
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import results  # noqa: E402
from scripts.helpers import REPO, cpu_facts, last_json_line  # noqa: E402

SCHEMA = results.Schema(
    "corpus_read", "a corpus larger than memory: moetrain's capped read vs reading the whole file",
    targets=tuple(results.Target(f"rows[case={case}].{key}", "<", thr, unit, f"{what}, {case} file",
                                 met_key="target_met")
                  for case in ("ordinary", "one-line")
                  for key, thr, unit, what in (("moetrain_peak_rss_mb", RSS_TARGET_MB, "MB", "moetrain peak RSS"),
                                               ("moetrain_s", SECONDS_TARGET, "s", "moetrain wall time"))),
    keys=("rows", "quick"))

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, path, cache, cap = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t0 = time.perf_counter()
if mode == "baseline":
    n = len(open(path, encoding="utf-8").read())
else:
    from moetrain.config import DataConfig
    from moetrain.data.training import prepare_local
    cfg = DataConfig(source="paths", paths=["big=" + path], cache_dir=cache,
                     **({"max_bytes_per_domain": cap} if cap else {}))
    prepare_local(cfg)
    n = cfg.max_bytes_per_domain
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "chars": n}))
"""


def write_ordinary(path: Path, size: int) -> None:
    """Lines of English-like words (~60 characters each) up to ``size`` bytes."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    block = "".join(" ".join(rng.choices(words, k=10)) + "\n" for _ in range(CHUNK // 60)).encode()
    _fill(path, block, size)


def write_one_line(path: Path, size: int) -> None:
    """One line of letters and digits, no whitespace at all, ``size`` bytes."""
    rng = random.Random(1)
    block = "".join(rng.choices(string.ascii_letters + string.digits, k=CHUNK)).encode()
    _fill(path, block, size)


def _fill(path: Path, block: bytes, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:left])
            left -= len(block)


def measure(mode: str, path: Path, cache: Path, cap: int, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(REPO), mode, str(path), str(cache), str(cap)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {path.name} failed:\n{proc.stderr[-2000:]}")
    return last_json_line(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MB files (smoke test)")
    ap.add_argument("--size-mb", type=int, default=1024, help="size of each generated file (MiB)")
    ap.add_argument("--dir", default=None, help="where to generate the files (default: the temp folder)")
    ap.add_argument("--cap-bytes", type=int, default=0,
                    help="data.max_bytes_per_domain (default: the config's default)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per measurement (seconds)")
    results.add_flag(ap)
    args = ap.parse_args(argv)
    size = (64 if args.quick and args.size_mb == 1024 else args.size_mb) << 20
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-", dir=args.dir))
    try:
        for case, writer in (("ordinary", write_ordinary), ("one-line", write_one_line)):
            path = tmp / f"{case}.txt"
            t0 = time.perf_counter()
            writer(path, size)
            gen_s = time.perf_counter() - t0
            base = measure("baseline", path, tmp / "cache", args.cap_bytes, args.timeout)
            ours = measure("moetrain", path, tmp / f"cache-{case}", args.cap_bytes, args.timeout)
            rows.append({"case": case, "file_mb": size / 2**20, "generate_s": round(gen_s, 1),
                         "baseline_s": round(base["seconds"], 2), "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
                         "moetrain_s": round(ours["seconds"], 2), "moetrain_peak_rss_mb": round(ours["peak_rss_mb"], 1),
                         "cap_mb": ours["chars"] / 1e6, "baseline_chars": base["chars"],
                         "rss_ratio": round(ours["peak_rss_mb"] / base["peak_rss_mb"], 3)})
            path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'case':<10} {'file MB':>8} {'cap MB':>7} {'baseline s':>11} {'baseline RSS MB':>16} "
          f"{'moetrain s':>11} {'moetrain RSS MB':>16} {'RSS ratio':>10}")
    for r in rows:
        print(f"{r['case']:<10} {r['file_mb']:>8.0f} {r['cap_mb']:>7.1f} {r['baseline_s']:>11.2f} "
              f"{r['baseline_peak_rss_mb']:>16.1f} {r['moetrain_s']:>11.2f} {r['moetrain_peak_rss_mb']:>16.1f} "
              f"{r['rss_ratio']:>10.3f}")
    print("baseline = read the whole file as text; moetrain = prepare_local (cap read + BPE + packing), "
          "default data.max_bytes_per_domain")
    met = all(r["moetrain_peak_rss_mb"] < RSS_TARGET_MB and r["moetrain_s"] < SECONDS_TARGET for r in rows)
    line = {"bench": "corpus_read", **cpu_facts(), "quick": args.quick, "rows": rows,
            "targets": {"peak_rss_mb_below": RSS_TARGET_MB, "seconds_below": SECONDS_TARGET}, "target_met": met}
    print(json.dumps(line))
    results.record(SCHEMA, line, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
