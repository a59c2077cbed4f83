"""Results recording and rendering (scripts/bench/results.py, scripts/tools/render_results.py): the pages
in the repository are exactly what the renderer writes from results/; a schema catches a JSON
line that drifts from its declaration; targets are evaluated as declared; recording is off in
quick runs, with --no-record and in the test suite; the slowest-tests block comes from JUnit XML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench import results  # noqa: E402
from scripts.bench.results import Schema, Target  # noqa: E402
from scripts.tools import render_results  # noqa: E402

SCHEMA = Schema("demo", "a demo benchmark", keys=("rows", "extra.n"), targets=(
    Target("speedup", ">=", 1.15, "x", "step time ratio"),
    Target("rows[case=b].rss_mb", "<", 600.0, "MB", "peak RSS of case b"),
    Target("share", ">=", 0.5, "%", "share judged by the benchmark", met_key="checks.share_ok"),
    Target("scale.wall_s", "<=", 60.0, "s", "only with --scale", optional=True),
))
PAYLOAD = {"speedup": 1.2, "rows": [{"case": "a", "rss_mb": 900.0}, {"case": "b", "rss_mb": 400.0}],
           "share": 0.7, "checks": {"share_ok": False}, "extra": {"n": 3}, "scale": None}


def test_pages_are_what_the_renderer_writes():
    pages = render_results.render(ROOT)
    stale = [str(p.relative_to(ROOT)) for p, text in pages.items() if p.read_text() != text]
    assert not stale, f"run python scripts/tools/render_results.py: {stale} differ from the results files"


def test_every_recorded_line_matches_the_targets_it_reports():
    for path in sorted((ROOT / "results").glob("*.jsonl")):
        for line in results.read(path):
            assert line["bench"] == path.stem and {"commit", "machine", "targets", "result"} <= set(line)
            for t in line["targets"]:  # the recorded measurement is the JSON's own value
                assert t["measured"] == results.lookup(line["result"], t["key"], None), (path, t["key"])


def test_schema_evaluates_targets_as_declared():
    assert SCHEMA.problems(PAYLOAD) == []
    rows = {r["key"]: r for r in SCHEMA.evaluate(PAYLOAD)}
    assert rows["speedup"]["met"] is True and rows["speedup"]["measured"] == 1.2
    assert rows["rows[case=b].rss_mb"]["measured"] == 400.0 and rows["rows[case=b].rss_mb"]["met"] is True
    # the benchmark's own verdict wins over the comparison (0.7 >= 0.5, but the JSON says not met)
    assert rows["share"]["met"] is False
    assert rows["scale.wall_s"]["measured"] is None and rows["scale.wall_s"]["met"] is False
    slow = dict(PAYLOAD, speedup=1.1, rows=[{"case": "b", "rss_mb": 600.0}])
    rows = {r["key"]: r for r in SCHEMA.evaluate(slow)}
    assert rows["speedup"]["met"] is False and rows["rows[case=b].rss_mb"]["met"] is False  # strict <
    assert not any(r["met"] for r in SCHEMA.evaluate(dict(PAYLOAD, speedup=None, checks={"share_ok": None}))
                   if r["key"] in ("speedup", "share"))


def test_schema_names_what_drifted():
    bad = {k: v for k, v in PAYLOAD.items() if k != "speedup"}
    bad["extra"] = {}
    bad["share"] = [0.7]
    problems = SCHEMA.problems(bad)
    assert problems == ["missing key extra.n", "missing target key speedup",
                        "target key share is [0.7], not a number, word or null"]
    with pytest.raises(ValueError, match="demo: JSON line does not match its schema: missing key extra.n"):
        SCHEMA.check(bad)
    assert SCHEMA.problems(dict(PAYLOAD, checks={"share_ok": "yes"})) == [
        "target share: checks.share_ok is not a boolean or null"]
    with pytest.raises(ValueError, match="worded threshold"):
        Target("cases", "==", "all cases")


def test_lookup_paths():
    d = {"a": {"b.c": 1, "d": {"e": 2}}, "x.y": 3, "rows": [{"k": "1", "v": 4}, {"k": 2, "v": 5}]}
    assert results.lookup(d, "a.b.c") == 1 and results.lookup(d, "a.d.e") == 2 and results.lookup(d, "x.y") == 3
    assert results.lookup(d, "rows[k=2].v") == 5  # compared as text
    assert not results.has(d, "rows[k=3].v") and not results.has(d, "a.d.f") and not results.has(d, "x.y.z")


def test_record_appends_a_line_with_commit_and_machine(tmp_path, monkeypatch):
    monkeypatch.delenv(results.NO_RECORD_ENV, raising=False)
    args = type("Args", (), {"quick": False, "no_record": False})()
    out = results.record(SCHEMA, PAYLOAD, args, results_dir=tmp_path, argv=["--x", "1"])
    results.record(SCHEMA, dict(PAYLOAD, speedup=1.0), args, results_dir=tmp_path, argv=[])
    assert out == tmp_path / "demo.jsonl"
    first, second = results.read(out)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    assert first["commit"]["sha"] == head and isinstance(first["commit"]["dirty"], bool)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert first["machine"]["cpu"] in cpuinfo and first["machine"]["cores"] >= 1
    assert first["machine"]["avx512_bf16"] == (" avx512_bf16" in cpuinfo)
    assert first["machine"]["amx_bf16"] == (" amx_bf16" in cpuinfo) and first["machine"]["load_average_1m"] >= 0
    assert first["argv"] == ["--x", "1"] and first["result"] == PAYLOAD and first["date"][:2] == "20"
    assert first["targets"][0]["met"] is True and second["targets"][0]["met"] is False


def test_quick_no_record_and_the_test_suite_record_nothing(tmp_path, monkeypatch, capsys):
    quick = type("Args", (), {"quick": True})()
    opted_out = type("Args", (), {"quick": False, "no_record": True})()
    assert os.environ.get(results.NO_RECORD_ENV) == "1"  # tests/conftest.py: the suite never records
    monkeypatch.delenv(results.NO_RECORD_ENV, raising=False)
    assert results.record(SCHEMA, PAYLOAD, quick, results_dir=tmp_path) is None
    assert results.record(SCHEMA, PAYLOAD, opted_out, results_dir=tmp_path) is None
    monkeypatch.setenv(results.NO_RECORD_ENV, "1")
    assert results.record(SCHEMA, PAYLOAD, None, results_dir=tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    # a line that does not match its schema fails the benchmark, recorded or not
    with pytest.raises(SystemExit) as exc:
        results.record(SCHEMA, {"speedup": 2.0}, quick, results_dir=tmp_path)
    assert exc.value.code == 1 and "missing key rows" in capsys.readouterr().err


def test_rendered_section_and_headline(tmp_path):
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    line = results.make_line(SCHEMA, PAYLOAD, argv=["--steps", "3"], date="2026-01-02T03:04:05+00:00",
                             commit_={"sha": "0123456789abcdef", "dirty": True},
                             machine_={"cpu": "Test CPU", "cores": 2, "avx512_bf16": True, "amx_bf16": False,
                                       "gpu": None, "load_average_1m": 3.25})
    (res_dir / "demo.jsonl").write_text(json.dumps(line) + "\n")
    text = render_results.render_benchmarks(render_results.load(res_dir))
    assert "| step time ratio | >= 1.15x | 1.2x | yes |" in text
    assert "| share judged by the benchmark | >= 50.0% | 70.0% | **no** |" in text
    assert "| only with --scale | <= 60 s | not measured | no (not measured) |" in text
    assert ("Measured on Test CPU, 2 cores (AVX512-BF16 yes, AMX-BF16 no; no GPU; load average 3.2 at the end), "
            "`0123456789` + uncommitted "
            "changes, 2026-01-02; arguments: `--steps 3`. Runs recorded: 1") in text
    headline = render_results.render_headline({})
    assert headline.count("earlier run (typed; not regenerated)") == len(render_results.HEADLINES)


def test_replace_block_keeps_the_prose():
    page = "intro\n<!-- results:x -->\nold\n<!-- /results -->\nafter\n<!-- results:y -->\nkeep\n<!-- /results -->\n"
    new = render_results.replace_block(page, "x", "new\n")
    assert new == page.replace("old\n", "new\n")
    with pytest.raises(ValueError, match="no <!-- results:z -->"):
        render_results.replace_block(page, "z", "")


def test_slowest_tests_from_junit(tmp_path):
    junit = tmp_path / "junit.xml"
    cases = "".join(f'<testcase classname="tests.pkg.test_m" name="test_{i}" time="{i}.25"/>' for i in range(30))
    junit.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    render_results.record_durations(junit, tmp_path)
    d = json.loads((tmp_path / render_results.DURATIONS).read_text())
    assert d["tests"] == 30 and len(d["slowest"]) == render_results.SLOWEST == 25
    assert d["slowest"][0] == {"test": "tests/pkg/test_m.py::test_29", "seconds": 29.25}
    assert d["slowest"][-1]["test"].endswith("test_5") and d["total_s"] == pytest.approx(sum(range(30)) + 7.5, abs=0.1)
    text = render_results.render_durations(tmp_path)
    assert "The 25 slowest of 30 tests" in text and "| 29.2 | `tests/pkg/test_m.py::test_29` |" in text


def test_check_mode_and_bad_junit_path():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/tools/render_results.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "up to date", proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/tools/render_results.py"), "--pytest-junit",
                           "/nonexistent/junit.xml"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("no such file")
