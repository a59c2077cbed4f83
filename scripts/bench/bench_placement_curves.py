"""Generalisation benchmark of expert placement: learning curves on the shared traces (issue 26).

Each trace in time order (Qwen: forward passes, ``step_T``; OLMoE: row order) is cut once: the
newest ``SLICE_FRACTION`` of its tokens is the fixed **score slice**; every fit window is the
newest N tokens before it (N = 500, 1,000, 2,000, 4,000 and all available; a window longer than
what the trace holds before the slice is reported as not available). On each window, at 4 ranks,
8 ranks and 2 nodes x 4 ranks and at load weight 0 and ``--load-weight``:

- **contiguous** (the baseline of every ratio), today's **pipeline** (``method="ilp"``) and the
  **validated** selection (``method="validated"``, placement/select.py; when the experts do not
  divide over the ranks it also chooses uneven slots or replicas by validation, select_slots), each
  with ``--per-layer-s`` seconds per layer; the pipeline and contiguous use ``ceil(E / R)`` slots
  (replicas in the extra slots: today's default);
- **Mt-KaHyPar** (placement/mtk.py: km1, fixed block sizes, ``MTK_SEEDS`` seeds, best km1 on the
  window), the same placement at both load weights (its objective has no load term).

Scored on the slice by the cost model: off-rank sends per token (dedup, mean over layers), rank
load max/mean, objective; each difference (validated - Mt-KaHyPar, validated - pipeline,
validated - contiguous, pipeline - Mt-KaHyPar) with a 95% paired-bootstrap interval over the
slice's tokens (cost.token_sends_T). Cross-trace rows (fit on one trace, score on another of the
same model) need two traces of one model: the shared traces are of two different models
(60 experts top-4 vs 64 experts top-8), so there is none; the JSON says so.

Prints the table, then one JSON line: ``validated_significantly_worse_than_mtkahypar_cases`` (per
window, load weight 0), ``validated_vs_contiguous_reduction`` (per case, with the pipeline's),
``selection_s_per_layer`` and the targets. Run with OMP_NUM_THREADS=1 (set here by default).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from placement import Placement, Topology, evaluate, load_routing, solve_placement  # noqa: E402
from placement import mtk  # noqa: E402
from placement.cost import token_sends_T  # noqa: E402
from placement.select import select_slots  # noqa: E402
from scripts.bench.bench_placement import paired_interval  # noqa: E402
from scripts.helpers import TRACES, cpu_model_and_flags, last_json_line  # noqa: E402

SLICE_FRACTION = 0.2  # newest share of each trace: the fixed score slice
WINDOWS = (500, 1000, 2000, 4000)  # plus "all" (every token before the slice)
MTK_SEEDS = 10
RESAMPLES = 1000
SENDS_TOL = 0.01  # "within 1% of Mt-KaHyPar's sends"


def time_split(stats):
    """(rows before the slice, oldest first; the slice's rows), cut on a step boundary."""
    T = stats.num_tokens
    order = np.argsort(stats.step_T, kind="stable") if stats.step_T is not None else np.arange(T)
    step = stats.step_T[order] if stats.step_T is not None else np.arange(T)
    cut = int(np.searchsorted(step, step[int(round((1 - SLICE_FRACTION) * T))], side="left"))
    return order[:cut], order[cut:]


def topologies(E: int) -> dict[str, dict]:
    return {"4 ranks": dict(num_ranks=4), "8 ranks": dict(num_ranks=8),
            "2x4 ranks": dict(num_ranks=8, ranks_per_node=4, inter_node_cost=4.0)}


def mtk_placement(fit, topo: Topology, seed: int = 0) -> Placement:
    rows = [mtk.mtk_row(fit.topk_ids_TLK[:, l], fit.load_LE[l], topo, seeds=MTK_SEEDS, seed=seed)
            for l in range(fit.num_layers)]
    return Placement(np.stack(rows), topo.slots_per_rank, fit.num_experts)


def _score(slice_, p: Placement, topo: Topology, lw: float) -> dict:
    c = evaluate(slice_, p, topo, load_weight=lw)
    return {"sends": c.sends, "imbalance": c.imbalance, "objective": c.objective}


def run_window(fit, slice_, tkw: dict, lws: tuple[float, ...], per_layer_s: float) -> list[dict]:
    """Every method on one fit window and topology, at each load weight, scored on the slice."""
    E, L = fit.num_experts, fit.num_layers
    topo = Topology.for_experts(E, **tkw)
    t = time.monotonic()
    mtk_p = mtk_placement(fit, topo)
    mtk_s = time.monotonic() - t
    cont = Placement.contiguous(L, E, topo.num_ranks, topo.slots_per_rank)
    rows = []
    for lw in lws:
        ilp = solve_placement(fit, topo, "ilp", time_limit_s=per_layer_s * L, load_weight=lw)
        t = time.monotonic()  # the slot layout decision included
        ch = select_slots(fit, topo.num_ranks, ranks_per_node=tkw.get("ranks_per_node", 0),
                          inter_node_cost=tkw.get("inter_node_cost", 4.0), method="validated",
                          time_limit_s=per_layer_s * L, load_weight=lw)
        ch_s = time.monotonic() - t
        placed = {"contiguous": (cont, topo, 0.0), "pipeline": (ilp.placement, topo, ilp.solve_time_s),
                  "validated": (ch.result.placement, ch.topology, ch_s),
                  "mtkahypar": (mtk_p, topo, mtk_s)}
        sends_T = {m: token_sends_T(slice_, p, t_) for m, (p, t_, _) in placed.items()}
        row = {"load_weight": lw, "fit_tokens": fit.num_tokens, "slice_tokens": slice_.num_tokens,
               "slots": ch.chosen, "slots_per_rank": list(ch.topology.slots_per_rank),
               "slot_val_scores": dict(ch.val_scores),
               "candidates_chosen": [r.source.split(":")[0] for r in ch.result.layers],
               "refit_layers": sum(r.refit for r in ch.result.layers),
               "val_tokens": ch.result.layers[0].val_tokens}
        for m, (p, t_, s) in placed.items():
            row[m] = dict(_score(slice_, p, t_, lw), s_per_layer=s / L)
        for a, b in (("validated", "mtkahypar"), ("validated", "pipeline"), ("validated", "contiguous"),
                     ("pipeline", "mtkahypar"), ("pipeline", "contiguous")):
            d, lo, hi = paired_interval(sends_T[a], sends_T[b], resamples=RESAMPLES)
            row[f"{a}-{b}"] = [d, lo, hi]
        base = row["contiguous"]["sends"]
        for m in ("pipeline", "validated", "mtkahypar"):
            row[m]["reduction_vs_contiguous"] = 1.0 - row[m]["sends"] / base
        rows.append(row)
    return rows


def curves(traces: dict[str, Path], windows: tuple, topo_names: list[str], lws: tuple[float, ...],
           per_layer_s: float, layers: int = 0) -> tuple[list[dict], list[dict]]:
    rows, missing = [], []
    for name, path in traces.items():
        stats = load_routing(path)
        if layers:
            stats = stats.select_layers(list(range(min(layers, stats.num_layers))))
        pool, sl = time_split(stats)
        slice_ = stats.take_rows(sl)
        for w in list(windows) + ["all"]:
            n = len(pool) if w == "all" else int(w)
            if n > len(pool):
                missing.append({"trace": name, "window": w, "available": len(pool)})
                continue
            fit = stats.take_rows(pool[len(pool) - n:])
            for tname in topo_names:
                for r in run_window(fit, slice_, topologies(stats.num_experts)[tname], lws, per_layer_s):
                    rows.append({"trace": name, "topology": tname, "window": str(w), **r})
                    _print_row(rows[-1])
    return rows, missing


def _print_row(r: dict) -> None:
    def ci(k):
        d, lo, hi = r[k]
        return f"{d:+.4f} [{lo:+.4f},{hi:+.4f}]"
    print(f"{r['trace']:<6}{r['topology']:<10}{r['window']:>6}{r['fit_tokens']:>6} lw={r['load_weight']:<4g}"
          f"{r['contiguous']['sends']:>8.4f}{r['pipeline']['sends']:>8.4f}{r['validated']['sends']:>8.4f}"
          f"{r['mtkahypar']['sends']:>8.4f}  {r['validated']['imbalance']:>6.3f}{r['mtkahypar']['imbalance']:>7.3f}"
          f"  {ci('validated-mtkahypar')}  {ci('validated-pipeline')}"
          f"  {r['validated']['s_per_layer']:>5.2f}  {r['slots']}", flush=True)


def summarise(rows: list[dict], missing: list[dict], per_layer_s: float, lw_default: float) -> dict:
    key = lambda r: f"{r['trace']} {r['topology']} w{r['window']} lw{r['load_weight']:g}"  # noqa: E731
    lw0 = [r for r in rows if r["load_weight"] == 0]
    lwd = [r for r in rows if r["load_weight"] == lw_default]
    worse = {}
    for r in lw0:
        worse[r["window"]] = worse.get(r["window"], 0) + int(r["validated-mtkahypar"][1] > 0)
    near = {key(r): bool(r["validated"]["sends"] <= (1 + SENDS_TOL) * r["mtkahypar"]["sends"]
                         and r["validated"]["imbalance"] <= r["mtkahypar"]["imbalance"] + 1e-9) for r in lwd}
    red = {key(r): {"validated": r["validated"]["reduction_vs_contiguous"],
                    "pipeline": r["pipeline"]["reduction_vs_contiguous"],
                    "difference_ci95": r["validated-pipeline"]} for r in rows}
    secs = [r["validated"]["s_per_layer"] for r in rows]
    targets = {
        "validated_not_significantly_worse_than_mtkahypar_lw0_every_window": bool(lw0) and sum(worse.values()) == 0,
        "validated_within_1pct_of_mtkahypar_and_balance_no_worse_default_lw": bool(near) and all(near.values()),
        "validated_reduction_ge_pipeline_every_case": bool(red) and all(
            v["validated"] >= v["pipeline"] - 1e-12 for v in red.values()),
        "selection_within_per_layer_budget": bool(secs) and max(secs) <= per_layer_s * 1.1,
    }
    return {
        "validated_significantly_worse_than_mtkahypar_cases": worse,
        "validated_significantly_better_than_mtkahypar_cases": {
            w: sum(int(r["validated-mtkahypar"][2] < 0) for r in lw0 if r["window"] == w) for w in worse},
        "validated_within_1pct_of_mtkahypar_default_lw": near,
        "validated_vs_contiguous_reduction": red,
        "validated_significantly_worse_than_pipeline_cases": sum(int(r["validated-pipeline"][1] > 0) for r in rows),
        "validated_significantly_better_than_pipeline_cases": sum(int(r["validated-pipeline"][2] < 0) for r in rows),
        "pipeline_significantly_worse_than_mtkahypar_lw0_cases": sum(int(r["pipeline-mtkahypar"][1] > 0) for r in lw0),
        "selection_s_per_layer": {"mean": float(np.mean(secs)) if secs else None,
                                  "max": float(np.max(secs)) if secs else None, "budget": per_layer_s},
        "windows_not_available": missing,
        "cross_trace": "not run: the shared traces are of two different models (Qwen1.5-MoE 60 experts top-4, "
                       "OLMoE 64 experts top-8); a placement of one cannot be scored on the other",
        "targets": targets, "all_targets_met": all(targets.values()),
    }


def render_markdown(out: dict) -> str:
    """The learning-curve table of a run's JSON line, as markdown (docs/placement.md)."""
    def ci(v):
        return f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"
    lines = ["| trace | ranks | window | lw | contiguous | pipeline | validated | Mt-KaHyPar | max/mean v / m "
             "| validated - Mt-KaHyPar [95%] | validated - pipeline [95%] | s/layer | slots |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['trace']} | {r['topology'].replace(' ranks', '')} | {r['window']} ({r['fit_tokens']}) "
                     f"| {r['load_weight']:g} | {r['contiguous']['sends']:.4f} | {r['pipeline']['sends']:.4f} "
                     f"| {r['validated']['sends']:.4f} | {r['mtkahypar']['sends']:.4f} "
                     f"| {r['validated']['imbalance']:.3f} / {r['mtkahypar']['imbalance']:.3f} "
                     f"| {ci(r['validated-mtkahypar'])} | {ci(r['validated-pipeline'])} "
                     f"| {r['validated']['s_per_layer']:.2f} | {r['slots']} |")
    lines += ["", "Learning curve: reduction of sends vs contiguous on the slice, mean over the three topologies "
              "(pipeline / validated / Mt-KaHyPar):", "",
              "| trace | lw | " + " | ".join(w for w in [str(x) for x in WINDOWS] + ["all"]) + " |",
              "|---|---|" + "---|" * (len(WINDOWS) + 1)]
    for trace in sorted({r["trace"] for r in out["rows"]}, reverse=True):
        for lw in sorted({r["load_weight"] for r in out["rows"]}):
            cells = []
            for w in [str(x) for x in WINDOWS] + ["all"]:
                rs = [r for r in out["rows"] if r["trace"] == trace and r["load_weight"] == lw and r["window"] == w]
                cells.append(" / ".join(f"{np.mean([r[m]['reduction_vs_contiguous'] for r in rs]):.1%}"
                                        for m in ("pipeline", "validated", "mtkahypar")) if rs else "n/a")
            lines.append(f"| {trace} | {lw:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_info() -> dict:
    model, flags = cpu_model_and_flags()
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=str(TRACES))
    ap.add_argument("--per-layer-s", type=float, default=2.0, help="time budget per layer of pipeline and selection")
    ap.add_argument("--load-weight", type=float, default=1.0, help="the default load weight (also run: 0)")
    ap.add_argument("--quick", action="store_true", help="Qwen, 2 layers, 4 and 8 ranks, windows 500 and all")
    ap.add_argument("--render", default="", help="print the markdown table of a saved JSON line and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(render_markdown(last_json_line(Path(args.render).read_text())))
        return 0
    if not mtk.available():
        print("error: this benchmark compares with Mt-KaHyPar: pip install mtkahypar (the bench extra)",
              file=sys.stderr)
        return 2
    tr = Path(args.traces)
    traces = {"qwen": tr / "qwen15moe_gsm8k25_5layers.npz", "olmoe": tr / "olmoe1b7b_gsm8k25_layer0.npz"}
    traces = {k: v for k, v in traces.items() if v.exists()}
    if not traces:
        print(f"error: no traces in {tr}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    lws = (0.0, args.load_weight)
    print(f"{'trace':<6}{'topology':<10}{'window':>6}{'fit':>6} lw     contig pipelin validat mtkahyp  "
          f"imb(v) imb(m)  validated-mtkahypar [95%]      validated-pipeline [95%]        s/lay  slots")
    if args.quick:
        rows, missing = curves({"qwen": traces["qwen"]} if "qwen" in traces else traces, (500,),
                               ["4 ranks", "8 ranks"], lws, args.per_layer_s, layers=2)
    else:
        rows, missing = curves(traces, WINDOWS, list(topologies(0)), lws, args.per_layer_s)
    out = summarise(rows, missing, args.per_layer_s, args.load_weight)
    for m in missing:
        print(f"window {m['window']} of {m['trace']}: not available ({m['available']} tokens before the slice)")
    print(f"cross-trace: {out['cross_trace']}")
    print(f"targets: {out['targets']}  ({time.monotonic() - t0:.0f} s)")
    print(json.dumps({**out, "rows": rows, "per_layer_s": args.per_layer_s, "quick": args.quick,
                      "slice_fraction": SLICE_FRACTION, "bootstrap_resamples": RESAMPLES,
                      "machine": cpu_info(), "wall_s": time.monotonic() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
