"""Benchmark of fault-domain-aware placement (placement/domains.py): what keeping experts on two
nodes costs, on the public routing traces.

Cases: each trace of ../shared/traces (or ``MOETRAIN_TRACES``) that is present, on 2 nodes x 4 ranks
(inter-node token cost 4x intra-node) with ``ceil(E / R) + spare`` slots per rank, ``spare`` = 1
and 2. Each case is fitted by the ILP pipeline on one half of the tokens (``split_tokens``, seed 0)
with ``fault_domain="none"`` and ``"node"`` and scored by the one cost model on the held-out half.

Columns: the experts per layer the slots allow on both nodes (k), the single-homed experts
(summed over layers) of each answer (for "none" as well: how many a node-blind placement leaves
on one node), held-out cross-node sends per token (``evaluate`` on the same placement with
intra-node cost 0, inter-node 1), link-weighted traffic and rank load max/mean (mean over
layers), the held-out objective, and the increase "node" costs over "none" (relative, on the
held-out and the fitted objective, the cross-node sends and the load skew). The pipeline is a
heuristic under a time limit, so "none" is not a lower bound of "node": the rule also changes
the replica counts (the k hottest get a second replica before any expert gets a third), which
can help on held-out tokens as well as cost load balance. Prints the table, then one JSON line with
the figures, the CPU model and the load average. A machine without the traces prints why and
exits 0 (nothing measured).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy's BLAS threads fight over 2 cores

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from placement import Topology, evaluate, load_routing, solve_placement, split_tokens  # noqa: E402
from placement.domains import FaultDomains  # noqa: E402
from scripts.bench import results  # noqa: E402
from scripts.helpers import TRACES  # noqa: E402

TRACE_FILES = {"qwen": "qwen15moe_gsm8k25_5layers.npz", "olmoe": "olmoe1b7b_gsm8k25_layer0.npz"}
NODES, RANKS_PER_NODE, INTER_NODE_COST = 2, 4, 4.0
SPARES = (1, 2)  # spare slots per rank beyond ceil(E / R)


def topology(num_experts: int, spare: int, inter: float = INTER_NODE_COST, intra: float = 1.0) -> Topology:
    R = NODES * RANKS_PER_NODE
    return Topology(R, -(-num_experts // R) + spare, RANKS_PER_NODE, intra_node_cost=intra, inter_node_cost=inter)


def run_case(name: str, stats, spare: int, time_limit_s: float, load_weight: float) -> dict:
    """One trace at one spare: "none" and "node" fitted on one half, scored on the other."""
    fit, held = split_tokens(stats, seed=0)
    topo = topology(stats.num_experts, spare)
    cross = topology(stats.num_experts, spare, inter=1.0, intra=0.0)  # cost 1 per cross-node send
    fd = FaultDomains.of(topo, "node", stats.num_experts)
    assert fd is not None
    row: dict = {"case": name, "spare_per_rank": spare, "slots_per_rank": topo.slots_per_rank[0],
                 "experts": stats.num_experts, "layers": stats.num_layers, "multi_homed_allowed": fd.num_multi}
    for mode in ("none", "node"):
        t0 = time.monotonic()
        res = solve_placement(fit, topo, "ilp", time_limit_s=time_limit_s * stats.num_layers,
                              load_weight=load_weight, fault_domain=mode)
        p = res.placement
        cost = evaluate(held, p, topo, load_weight=load_weight)
        row[mode] = {
            "single_homed_experts": sum(len(h) for h in fd.single_homed(p)),
            "cross_node_sends": evaluate(held, p, cross, load_weight=0.0).traffic,
            "traffic": cost.traffic,
            "imbalance": cost.imbalance,
            "objective": cost.objective,
            "fit_objective": res.cost.objective,
            "solve_s": round(time.monotonic() - t0, 2),
        }
    a, b = row["none"], row["node"]
    row["increase"] = {k: (b[k] - a[k]) / a[k] if a[k] else None
                       for k in ("objective", "fit_objective", "cross_node_sends", "traffic", "imbalance")}
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'case':<7}{'spare':>6}{'k':>4}{'mode':>6}{'single':>8}{'x-node':>9}{'traffic':>9}{'max/mean':>9}"
            f"{'objective':>10}{'solve s':>9}")
    lines = [head]
    for r in rows:
        for mode in ("none", "node"):
            m = r[mode]
            lines.append(f"{r['case']:<7}{r['spare_per_rank']:>6}{r['multi_homed_allowed']:>4}{mode:>6}"
                         f"{m['single_homed_experts']:>8}{m['cross_node_sends']:>9.3f}{m['traffic']:>9.3f}"
                         f"{m['imbalance']:>9.3f}{m['objective']:>10.3f}{m['solve_s']:>9.1f}")
        inc = r["increase"]
        lines.append(f"{'':<7}{'':>6}{'':>4}{'node vs none':>14}: objective {100 * inc['objective']:+.1f}% "
                     f"(fitted {100 * inc['fit_objective']:+.1f}%), cross-node sends "
                     f"{100 * inc['cross_node_sends']:+.1f}%, max/mean {100 * inc['imbalance']:+.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=10.0, help="ILP seconds per layer")
    ap.add_argument("--load-weight", type=float, default=1.0)
    args = ap.parse_args(argv)
    found = {name: TRACES / f for name, f in TRACE_FILES.items() if (TRACES / f).is_file()}
    out: dict = {"bench": "fault_domain", "traces": str(TRACES), "machine": results.machine(), "rows": []}
    if not found:
        print(f"no trace under {TRACES} (set MOETRAIN_TRACES): nothing to measure")
        print(json.dumps({**out, "skipped": "no traces"}))
        return 0
    for name, path in found.items():
        stats = load_routing(path)
        for spare in SPARES:
            out["rows"].append(run_case(name, stats, spare, args.time_limit, args.load_weight))
    print(f"2 nodes x 4 ranks, inter-node cost {INTER_NODE_COST}; fitted on half the tokens, held-out half scored; "
          f"CPU {out['machine']['cpu']}, load {out['machine']['load_average_1m']}")
    print(table(out["rows"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
