"""scripts/bench/bench_multinode.py's report: one row per arm from the arm driver's output, the ratios the
issue asks for, targets met or not (and which keys are missing, with why), the table.

Bytes are per optimizer step, over the timed window only. ``internode`` = bytes the Ray nodes sent
onto their links (every byte on a link goes to another node: the bridge namespace holds no
process). Counted bytes (by kind: expert all-to-all, dense gradient all-reduce, ...; intra / inter
node) are the step metrics' ``traffic``, summed over ranks, when the checkout counts them.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from scripts.helpers import cpu_model_and_flags, last_json_line


def cpu_info() -> dict:
    model, flags = cpu_model_and_flags()
    return {"cpu_model": model, "cores": os.cpu_count(), "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def _node_of(address: str, info) -> str:
    return next((n.name for n in info.nodes if n.address == address), address)


def counted_bytes(steps: list[dict]) -> dict[str, dict[str, float]]:
    """The dispatcher's and trainer's own byte counts (``StepMetrics.traffic``), mean per step:
    ``{kind: {"intra": B, "inter": B}}``; {} when the checkout does not count."""
    rows = [s["traffic"] for s in steps if "traffic" in s]
    if not rows:
        return {}
    return {k: {"intra": statistics.fmean(r[k][0] for r in rows), "inter": statistics.fmean(r[k][1] for r in rows)}
            for k in rows[0]}


def arm_row(layout: str, rate: float, dispatch: str, placement: str, res: dict, info) -> dict:
    w = res["window"]
    steps = [s for s in res["steps"] if w["from_step"] < s["step"] <= w["to_step"]]
    n = max(w["steps"], 1)
    ray_nodes = [nd.name for nd in info.ray_nodes()]
    sent = {k: v["sent"] / n for k, v in w["links"].items() if k in ray_nodes}
    rank_nodes = [_node_of(a, info) for a in res.get("rank_addresses", [])]
    return {"layout": layout, "rate_mbit": rate, "dispatch": dispatch, "placement": placement,
            "step_s": w["seconds"] / n, "step_s_median": statistics.median(s["step_time_s"] for s in steps),
            "internode_bytes_per_step": sum(sent.values()), "sent_per_node": sent,
            "rank_nodes": rank_nodes, "ranks_node_contiguous": rank_nodes == sorted(rank_nodes),
            "offrank_rows_per_step": statistics.fmean(s["offrank_sends"] for s in steps),
            "placement_group_nodes": sorted(set(rank_nodes)),
            "counted": counted_bytes(steps), "loss_last": steps[-1]["loss"] if steps else None}


def _mb(r: dict, kind: str) -> str:
    v = r["counted"].get(kind, {}).get("inter") if r["counted"] else None
    return "-" if v is None else f"{v / 1e6:.2f}"


def row_text(r: dict) -> str:
    counted = _inter(r) / 1e6 if r["counted"] else None
    return (f"{r['layout']:>4} {r['rate_mbit']:>6g} {r['dispatch']:>12} {r['placement']:>10} "
            f"{r['step_s']:>7.2f} {r['internode_bytes_per_step'] / 1e6:>9.2f} "
            f"{'-' if counted is None else format(counted, '.2f'):>8} {_mb(r, 'a2a'):>7} {_mb(r, 'dense_grads'):>7} "
            f"{'-' if r['offrank_rows_per_step'] is None else format(r['offrank_rows_per_step'], '.0f'):>9}  "
            f"{'-'.join(r['rank_nodes'])}")


HEADER = (f"{'lay':>4} {'Mbit/s':>6} {'dispatch':>12} {'placement':>10} {'step s':>7} {'iface MB':>9} "
          f"{'count MB':>8} {'a2a MB':>7} {'dense MB':>7} {'off-rank':>9}  rank -> node")


def _inter(r: dict) -> float:
    return sum(v["inter"] for v in r["counted"].values())


def _name(r: dict) -> str:
    return f"{r['layout']}/{r['rate_mbit']:g}/{r['dispatch']}+{r['placement']}"


def dense_bound(fc: dict, best: dict | None, rate_mbit: float) -> dict:
    """How far removing expert all-to-all bytes alone could speed up flat+contiguous at this rate:
    each node's link carries its share of the inter-node bytes at ``rate_mbit``; if every
    all-to-all byte vanished, the step would shrink by at most the link time of those bytes."""
    nodes = max(len(fc["sent_per_node"]), 1)
    link_Bps = rate_mbit * 1e6 / 8
    a2a = fc["counted"].get("a2a", {}).get("inter", 0.0)
    dense = fc["counted"].get("dense_grads", {}).get("inter", 0.0)
    a2a_link_s = a2a / nodes / link_Bps
    floor_s = max(fc["step_s"] - a2a_link_s, 1e-9)
    out = {"step_s_flat_contiguous": fc["step_s"], "a2a_inter_bytes": a2a, "dense_inter_bytes": dense,
           "a2a_link_s": a2a_link_s, "dense_link_s": dense / nodes / link_Bps,
           "speedup_bound_if_no_a2a_bytes": fc["step_s"] / floor_s}
    if best is not None:
        out["best_arm_a2a_inter_bytes"] = best["counted"].get("a2a", {}).get("inter", 0.0) if best["counted"] else None
    return out


def _find(rows, layout, rate, dispatch, placement):
    return next((r for r in rows if (r["layout"], r["rate_mbit"], r["dispatch"], r["placement"])
                 == (layout, rate, dispatch, placement)), None)


def _met(value, rule) -> bool | None:
    if value is None:
        return None
    op, t = rule
    return {"<=": lambda: value <= t, ">=": lambda: value >= t, "==": lambda: value == t,
            "in": lambda: t[0] <= value <= t[1]}[op]()


def summarize(rows: list[dict], plans: dict, extra: dict, args, has_dispatch: bool, targets: dict) -> dict:
    rate = 100.0
    fc = _find(rows, "2x2", rate, "flat", "contiguous")
    fi = _find(rows, "2x2", rate, "flat", "ilp")
    hc = _find(rows, "2x2", rate, "hierarchical", "contiguous")
    out: dict = {"bench": "multinode", "quick": bool(args.quick), **cpu_info(), "warm_steps": args.warm_steps,
                 "timed_steps": args.timed_steps, "missing": {}}
    ratio = lambda a, b, k: (a[k] / b[k]) if a and b and b[k] else None  # noqa: E731
    out["internode_bytes_topo_vs_contiguous"] = ratio(fi, fc, "internode_bytes_per_step")
    out["internode_bytes_hier_vs_flat"] = ratio(hc, fc, "internode_bytes_per_step")
    at100 = [r for r in rows if r["layout"] == "2x2" and r["rate_mbit"] == rate]
    ds = _find(rows, "2x2", rate, "deepspeed", "contiguous")
    mt100 = [r for r in at100 if r["dispatch"] != "deepspeed"]
    best = min(mt100, key=lambda r: r["step_s"]) if mt100 else None
    out["step_speedup_best_vs_flat_contiguous_100mbit"] = (fc["step_s"] / best["step_s"]) if fc and best else None
    out["best_arm_100mbit"] = f"{best['dispatch']}+{best['placement']}" if best else None
    out["step_speedup_best_vs_deepspeed_100mbit"] = (ds["step_s"] / best["step_s"]) if ds and best else None
    if ds is None:
        out["missing"]["step_speedup_best_vs_deepspeed_100mbit"] = "the DeepSpeed-MoE peer did not run (--no-deepspeed)"
    if not has_dispatch:
        out["missing"]["internode_bytes_hier_vs_flat"] = "model.moe.dispatch is not in this checkout (hierarchical dispatch)"
    counted_arms = [r for r in rows if r["counted"]]
    if counted_arms:  # over every moetrain arm: counted inter-node bytes / what the interfaces carried
        out["counted_vs_interface_bytes"] = (sum(_inter(r) for r in counted_arms)
                                             / sum(r["internode_bytes_per_step"] for r in counted_arms))
        out["counted_vs_interface_bytes_per_arm"] = {_name(r): _inter(r) / r["internode_bytes_per_step"]
                                                     for r in counted_arms}
    else:
        out["counted_vs_interface_bytes"] = None
        out["missing"]["counted_vs_interface_bytes"] = "the step metrics carry no inter-node byte counters in this checkout"
    if fc and fc["counted"]:
        out["dense_bound_100mbit"] = bound = dense_bound(fc, best, rate)
        speedup = out["step_speedup_best_vs_flat_contiguous_100mbit"]
        # Above the bound, the baseline's step was slowed by something else than its bytes (the
        # machine's load): the speedup is not the dispatch's alone.
        bound["measured_speedup_within_bound"] = None if speedup is None else bool(
            speedup <= bound["speedup_bound_if_no_a2a_bytes"] * 1.05)
    out.update(extra)
    out["placements"] = {k: p.summary() for k, p in plans.items()}
    out["arms"] = rows
    out["targets"] = {k: {"rule": f"{op} {t}", "met": _met(out.get(k), (op, t))} for k, (op, t) in targets.items()}
    out["all_targets_met"] = all(v["met"] for v in out["targets"].values())
    return out


def table(rows: list[dict], plans: dict, result: dict) -> str:
    lines = [HEADER, "-" * len(HEADER),
             "(per step: iface = inter-node bytes the links carried; count / a2a / dense = the run's own inter-node "
             "counts: all kinds / expert all-to-all / dense gradient all-reduce)"]
    lines += [row_text(r) for r in rows]
    lines.append("")
    for k, p in plans.items():
        s = p.summary()
        exact = (f"{s['exact_internode_rows_per_token']:.3f}" if s["exact_internode_rows_per_token"] is not None
                 else s["exact_note"])
        lines.append(f"placement {k}: inter-node rows/token/layer (cost model) contiguous "
                     f"{s['model_internode_rows_per_token_contiguous']:.3f}, ILP {s['model_internode_rows_per_token_ilp']:.3f} "
                     f"({s['ilp_status']}, bound {s['ilp_bound']:.3f} on objective {s['ilp_objective']:.3f}); exact: {exact}")
    for k, v in result["targets"].items():
        val = result.get(k)
        lines.append(f"{k:<48} {val if not isinstance(val, float) else round(val, 3)!s:>10}  {v['rule']:<14} "
                     f"{'met' if v['met'] else ('MISSING' if v['met'] is None else 'not met')}")
    if "dense_bound_100mbit" in result:
        d = result["dense_bound_100mbit"]
        lines.append(f"dense bound at 100 Mbit/s: flat+contiguous step {d['step_s_flat_contiguous']:.2f} s; its a2a "
                     f"inter-node bytes need {d['a2a_link_s']:.2f} s of link time, the dense all-reduce "
                     f"{d['dense_link_s']:.2f} s: even with no a2a bytes at all the step speedup is <= "
                     f"{d['speedup_bound_if_no_a2a_bytes']:.2f}x"
                     + ("" if d.get("measured_speedup_within_bound") in (True, None)
                        else " (the measured speedup is above it: the baseline's step was slowed by the machine's "
                             "load, not only by its bytes)"))
    for k, why in result["missing"].items():
        lines.append(f"missing {k}: {why}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """docs/multinode.md's benchmark table, from the JSON line (``python -m scripts.bench.netbench.report FILE``)."""
    mb = lambda x: "-" if x is None else f"{x / 1e6:.2f}"  # noqa: E731
    lines = ["| layout | link | dispatch + placement | step s (rounds) | inter-node MB/step (interfaces) | "
             "counted: a2a / dense / all | rank -> node |", "|---|---|---|---|---|---|---|"]
    for r in result["arms"]:
        c = r["counted"] or {}
        counted = (f"{mb(c.get('a2a', {}).get('inter'))} / {mb(c.get('dense_grads', {}).get('inter'))} / "
                   f"{mb(_inter(r))}") if c else "-"
        rounds = ", ".join(f"{x:.2f}" for x in r.get("step_s_rounds", [r["step_s"]]))
        lines.append(f"| {r['layout']} | {r['rate_mbit']:g} Mbit/s | {r['dispatch']} + {r['placement']} | "
                     f"{r['step_s']:.2f} ({rounds}) | {mb(r['internode_bytes_per_step'])} | {counted} | "
                     f"{'-'.join(r['rank_nodes'])} |")
    lines += ["", "| key | value | target | met |", "|---|---|---|---|"]
    for k, v in result["targets"].items():
        val = result.get(k)
        val = f"{val:.3f}" if isinstance(val, float) else str(val)
        lines.append(f"| `{k}` | {val} | {v['rule']} | {'yes' if v['met'] else ('missing' if v['met'] is None else 'no')} |")
    ds = result.get("step_speedup_best_vs_deepspeed_100mbit")
    lines.append(f"| `step_speedup_best_vs_deepspeed_100mbit` | {'-' if ds is None else format(ds, '.3f')} | "
                 "(goal >= 1.5) | reported |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(markdown(last_json_line(Path(sys.argv[1]).read_text())))
