"""Run every outside probe (see ``scripts/tools/probes/__init__.py``): a table, then one JSON line."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[3])  # ``python scripts/tools/probes`` from anywhere
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from scripts.tools.probes import Probe  # noqa: E402


def all_probes() -> list[Probe]:
    pkg = Path(__file__).resolve().parent
    probes: list[Probe] = []
    for mod in sorted(m.name for m in pkgutil.iter_modules([str(pkg)]) if m.name.startswith("p_")):
        probes.extend(importlib.import_module(f"scripts.tools.probes.{mod}").PROBES)
    return probes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="run only probes whose name or item contains this")
    args = ap.parse_args(argv)
    probes = [p for p in all_probes() if args.only in p.name or args.only in p.item]
    rows = []
    for p in probes:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="moetrain-probe-") as tmp:
            try:
                ok, detail = p.run(Path(tmp))
            except Exception as exc:  # a probe that crashes has failed
                ok, detail = False, f"probe crashed: {type(exc).__name__}: {exc}"
                traceback.print_exc()
        rows.append((p.item, p.name, ok, time.monotonic() - t0, detail))
        print(f"{p.item:6} {'ok  ' if ok else 'FAIL'} {rows[-1][3]:6.1f}s  {p.name}: {detail}", flush=True)
    passed = sum(r[2] for r in rows)
    print(json.dumps({"probes": len(rows), "passed": passed, "failed": len(rows) - passed,
                      "failed_names": [r[1] for r in rows if not r[2]]}))
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
