"""Benchmark results: each benchmark's declared schema (its targets and the keys of its JSON line)
and the recording of its JSON line, with commit, date and machine, to ``results/<bench>.jsonl``.

A benchmark declares one ``Schema`` next to its code and, after printing its JSON line, calls

    results.record(SCHEMA, payload, args)        # args: its argparse namespace (for --quick / --no-record)

``record`` checks ``payload`` against the schema (a benchmark whose JSON drifts from its declaration
fails, exit status 1), evaluates every target and appends one line to the results file. Quick
runs, ``--no-record`` (``results.add_flag(parser)``) and ``MOETRAIN_NO_RECORD=1`` (set by the test
suite) record nothing. ``scripts/tools/render_results.py`` renders docs/benchmarks.md and README's
headline table from these files; nothing is typed by hand.

A target's ``met`` is what the JSON says when the benchmark decides it itself (``met_key``: rules
such as "median of >= 5 runs"), else the declared comparison applied to the measured value; a
value that did not come back (null) never meets its target.
"""

from __future__ import annotations

import datetime
import json
import operator
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.helpers import REPO, cpu_facts

RESULTS_DIR = REPO / "results"
NO_RECORD_ENV = "MOETRAIN_NO_RECORD"
_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


@dataclass(frozen=True)
class Target:
    """One target of a benchmark: ``key`` (a dotted path into the JSON line) compared with
    ``threshold``; ``met_key`` names the JSON's own boolean when the benchmark judges it (then
    ``threshold`` may be a word, e.g. "all cases"); ``optional``: the run may not measure it (a
    case left out by a flag), and then it is not met."""

    key: str
    comparison: str  # one of >=, <=, >, <, ==
    threshold: float | str
    unit: str = ""  # "x", "%" (value is a share, shown as percent), "s", "MB", ""
    description: str = ""
    met_key: str | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        if self.comparison not in _COMPARE:
            raise ValueError(f"target {self.key}: comparison {self.comparison!r} is not one of {sorted(_COMPARE)}")
        if isinstance(self.threshold, str) and self.met_key is None:
            raise ValueError(f"target {self.key}: a worded threshold needs the benchmark's own met_key")

    def text(self) -> str:
        if isinstance(self.threshold, str):
            return self.threshold
        return f"{self.comparison} {format_value(self.threshold, self.unit)}"


@dataclass(frozen=True)
class Schema:
    """What a benchmark's JSON line must carry: ``keys`` (dotted paths) and its ``targets``."""

    bench: str
    description: str
    targets: tuple[Target, ...] = ()
    keys: tuple[str, ...] = ()

    def problems(self, payload: dict) -> list[str]:
        """Every way ``payload`` departs from the schema (empty: it conforms)."""
        out = []
        for key in self.keys:
            if not has(payload, key):
                out.append(f"missing key {key}")
        for t in self.targets:
            if not has(payload, t.key):
                if not t.optional:
                    out.append(f"missing target key {t.key}")
            elif not isinstance(lookup(payload, t.key), (int, float, str, type(None))):
                out.append(f"target key {t.key} is {lookup(payload, t.key)!r}, not a number, word or null")
            if t.met_key is not None and not t.optional and not has(payload, t.met_key):
                out.append(f"target {t.key}: missing {t.met_key}")
            elif t.met_key is not None and not isinstance(lookup(payload, t.met_key, None), (bool, type(None))):
                out.append(f"target {t.key}: {t.met_key} is not a boolean or null")
        return out

    def check(self, payload: dict) -> None:
        bad = self.problems(payload)
        if bad:
            raise ValueError(f"{self.bench}: JSON line does not match its schema: " + "; ".join(bad))

    def evaluate(self, payload: dict) -> list[dict]:
        """One row per target: declared target, measured value, met."""
        rows = []
        for t in self.targets:
            value = lookup(payload, t.key, None)
            if t.met_key is not None:
                met = bool(lookup(payload, t.met_key, False))
            else:
                met = _is_number(value) and bool(_COMPARE[t.comparison](value, t.threshold))
            rows.append({"key": t.key, "description": t.description, "comparison": t.comparison,
                         "threshold": t.threshold, "unit": t.unit, "measured": value, "met": met})
        return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_MISSING = object()


def lookup(payload: dict, key: str, default: Any = _MISSING) -> Any:
    """``payload["a"]["b"]`` for ``key`` "a.b" (at each level the whole rest is tried first: keys
    may hold dots); ``rows[case=qwen,method=ilp]`` selects the first dict of the list ``rows`` with
    those values."""
    node: Any = payload
    rest = key
    while rest:
        if isinstance(node, dict) and rest in node:
            return node[rest]
        m = re.match(r"([^.\[]+)(?:\[([^\]]*)\])?\.?", rest)
        name, sel, rest = m.group(1), m.group(2), rest[m.end():]
        node = node.get(name, _MISSING) if isinstance(node, dict) else _MISSING
        if sel is not None:
            want = dict(kv.split("=", 1) for kv in sel.split(","))
            rows = node if isinstance(node, list) else []
            node = next((r for r in rows if isinstance(r, dict) and all(str(r.get(k)) == v for k, v in want.items())),
                        _MISSING)
        if node is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
    return node


def has(payload: dict, key: str) -> bool:
    absent = object()
    return lookup(payload, key, absent) is not absent


def format_value(v: Any, unit: str = "") -> str:
    if v is None:
        return "not measured"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if unit == "%":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        text = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    else:
        text = f"{v:,}" if isinstance(v, int) and abs(v) >= 1e5 else str(v)
    return f"{text}{'' if not unit else ('x' if unit == 'x' else ' ' + unit)}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def commit() -> dict:
    """HEAD of the repository and whether the working tree differs from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha or None, "dirty": dirty if sha else None}


def machine() -> dict:
    """CPU model, cores, bf16 instruction sets (``scripts.helpers.cpu_facts``), the GPU (if torch
    sees one) and the load average (other jobs on the same cores make timings noisy)."""
    gpu = None
    if "torch" in sys.modules or _torch_importable():
        import torch
        if torch.cuda.is_available():
            gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {**cpu_facts(), "gpu": gpu, "load_average_1m": round(os.getloadavg()[0], 2)}


def _torch_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def add_flag(parser) -> None:
    parser.add_argument("--no-record", action="store_true",
                        help=f"do not append the JSON line to results/ (also: {NO_RECORD_ENV}=1; --quick never records)")


def recording(args: Any = None) -> bool:
    if os.environ.get(NO_RECORD_ENV, "") not in ("", "0"):
        return False
    return not (getattr(args, "quick", False) or getattr(args, "no_record", False))


def record(schema: Schema, payload: dict, args: Any = None, *, results_dir: Path | None = None,
           argv: list[str] | None = None) -> Path | None:
    """Check ``payload`` against ``schema``; unless recording is off, append the line to
    ``results/<bench>.jsonl`` and return its path. A mismatch exits with status 1."""
    try:
        schema.check(payload)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(1) from None
    if not recording(args):
        return None
    line = make_line(schema, payload, argv=sys.argv[1:] if argv is None else argv)
    out = (results_dir or RESULTS_DIR) / f"{schema.bench}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(line, default=float, sort_keys=False) + "\n")
    print(f"recorded in {out.relative_to(REPO) if out.is_relative_to(REPO) else out}", file=sys.stderr)
    return out


def make_line(schema: Schema, payload: dict, *, argv: list[str], date: str | None = None,
              commit_: dict | None = None, machine_: dict | None = None, source: str | None = None) -> dict:
    """The results-file line of one run: schema, when, which code, which machine, targets, the JSON.
    ``date`` / ``commit_`` / ``machine_`` default to now / HEAD / this machine; ``source`` names
    where a line adopted from an older file came from."""
    line = {"bench": schema.bench, "description": schema.description,
            "date": date or now(),
            "commit": commit_ or commit(), "machine": machine_ or machine(), "argv": argv,
            "targets": schema.evaluate(payload), "result": payload}
    if source:
        line["source"] = source
    return line


def read(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
