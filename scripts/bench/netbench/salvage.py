"""Rebuild scripts/bench/bench_multinode.py's table and JSON line from a work folder whose run stopped
before its report (every arm leaves ``<run>.out.json``, the DeepSpeed peer ``ds-*.out.json``, the
plans are in ``bench.log``):

    python -m scripts.bench.netbench.salvage WORK_DIR

Only measured files are read. Node loss: restarts and the final state from ``loss.out.json``;
the recovery time from the driver log's timestamps (1 s resolution): from the last step logged
before the kill to the first step logged after the resume. The committed checkpoints' verification
happened inside the stopped run and is not recoverable: that key is reported missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from scripts.bench.bench_multinode import TARGETS
from scripts.bench.netbench import report

ARM = re.compile(r"^(\d+x\d+)-(\d+)-(flat|hierarchical)-(contiguous|ilp_node|ilp)-r(\d+)\.out\.json$")
DS = re.compile(r"^ds-(\d+x\d+)-(\d+)-r(\d+)\.out\.json$")


def _info(work: Path, run: str):
    spec = json.loads((work / f"{run}.spec.json").read_text())
    names = list(spec["links"])
    arm = json.loads((work / f"{run}.out.json").read_text())
    prefix = arm["rank_addresses"][0].rsplit(".", 1)[0] if arm.get("rank_addresses") else "198.18.0"
    nodes = [SimpleNamespace(name=n, address=f"{prefix}.{int(n[1:]) + 1}") for n in names]
    return SimpleNamespace(nodes=nodes, ray_nodes=lambda: nodes)


def _ds_row(layout: str, rate: float, res: dict) -> dict:
    nodes, rpn = (int(x) for x in layout.split("x"))
    n = res["steps"]
    return {"layout": layout, "rate_mbit": rate, "dispatch": "deepspeed", "placement": "contiguous",
            "step_s": res["seconds"] / n, "step_s_median": sorted(res["step_times"])[n // 2],
            "internode_bytes_per_step": sum(v["sent"] for v in res["links"].values()) / n,
            "sent_per_node": {k: v["sent"] / n for k, v in res["links"].items()},
            "rank_nodes": [f"n{r // rpn}" for r in range(nodes * rpn)], "ranks_node_contiguous": True,
            "offrank_rows_per_step": None, "counted": {}, "loss_last": None}


def rows_from(work: Path) -> list[dict]:
    runs: dict[tuple, list[dict]] = {}
    for f in sorted(work.glob("*.out.json")):
        if m := ARM.match(f.name):
            layout, rate, dispatch, placement, _k = m.groups()
            res = json.loads(f.read_text())
            if res.get("state") != "finished" or "window" not in res:
                continue
            row = report.arm_row(layout, float(rate), dispatch, placement, res, _info(work, f.name[:-9]))
        elif m := DS.match(f.name):
            layout, rate, _k = m.groups()
            row = _ds_row(layout, float(rate), json.loads(f.read_text()))
        else:
            continue
        runs.setdefault((row["layout"], row["rate_mbit"], row["dispatch"], row["placement"]), []).append(row)
    out = []
    for key in sorted(runs):
        best = dict(min(runs[key], key=lambda r: r["step_s"]))
        best["step_s_rounds"] = [r["step_s"] for r in runs[key]]
        out.append(best)
    return out


def plans_from(work: Path) -> dict:
    plans = {}
    for line in (work / "bench.log").read_text().splitlines():
        if m := re.match(r"^plan (\S+): (\{.*\})$", line):
            d = json.loads(m.group(2))
            plans[m.group(1)] = SimpleNamespace(summary=lambda d=d: d)
    return plans


def node_loss_from(work: Path) -> dict:
    res = json.loads((work / "loss.out.json").read_text())
    log = (work / "loss.log").read_text(errors="replace").splitlines()
    killed = re.search(r"node loss: killed \d+ processes of n1 after step (\d+)", (work / "bench.log").read_text())
    t = lambda line: datetime.strptime(line[:8], "%H:%M:%S")  # noqa: E731
    recovery = None
    if killed:
        k = int(killed.group(1))
        before = [ln for ln in log if re.match(rf"^\d\d:\d\d:\d\d INFO step\s+{k} \|", ln)]
        resumed = next((i for i, ln in enumerate(log) if "resumed from s3://" in ln), None)
        after = [ln for ln in log[resumed:] if re.match(r"^\d\d:\d\d:\d\d INFO step\s+\d+ \|", ln)] if resumed else []
        if before and after:
            recovery = (t(after[0]) - t(before[0])).total_seconds()
    return {"node_loss_recovered": res["state"] == "finished" and res["restarts"] >= 1 and killed is not None,
            "node_loss_recovery_s": recovery, "committed_checkpoints_corrupted": None,
            "node_loss_restarts": res["restarts"], "node_loss_state": res["state"],
            "node_loss_recovery_note": "from the driver log's timestamps (1 s resolution)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir")
    a = ap.parse_args(argv)
    work = Path(a.work_dir)
    rows, plans = rows_from(work), plans_from(work)
    extra = node_loss_from(work) if (work / "loss.out.json").exists() else {}
    warm = json.loads((work / "warm.spec.json").read_text())
    steps = int(next(o.split("=")[1] for o in warm["overrides"] if o.startswith("train.steps=")))
    args = SimpleNamespace(quick=False, warm_steps=steps, timed_steps=None)
    result = report.summarize(rows, plans, extra, args, True, TARGETS)
    result["salvaged_from"] = str(work)
    if extra:
        result["missing"]["committed_checkpoints_corrupted"] = (
            "verified inside the run, which stopped before its report (a hung DeepSpeed peer was killed)")
    print(report.table(rows, plans, result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
