"""Smoke test of scripts/bench/bench_corpus_read.py: small files and a small cap; the table and the
JSON line report both cases, the baseline read the whole file and moetrain only the cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_corpus_read_small(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench/bench_corpus_read.py"), "--quick",
                           "--size-mb", "8", "--cap-bytes", "200000", "--dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[0].split()[:2] == ["case", "file"]
    out = json.loads(lines[-1])
    sys.path.insert(0, str(ROOT))
    from scripts.bench.bench_corpus_read import SCHEMA
    assert out["bench"] == "corpus_read" and SCHEMA.problems(out) == []
    assert {t["met"] for t in SCHEMA.evaluate(out)} == {out["target_met"]}  # the benchmark's verdict
    rows = {r["case"]: r for r in out["rows"]}
    assert set(rows) == {"ordinary", "one-line"}
    for r in rows.values():
        assert r["file_mb"] == 8 and r["cap_mb"] == 0.2
        assert r["baseline_chars"] == 8 << 20  # the baseline read every byte
        assert r["moetrain_s"] > 0 and r["moetrain_peak_rss_mb"] > 0
    assert list(tmp_path.iterdir()) == []  # the generated files are gone
