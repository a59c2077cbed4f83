"""Command line: ``python -m placement --trace PATH [--ranks 4] [--method ilp] [--out p.json]``.

Owns: argument parsing, the comparison table against the baselines, writing the placement JSON.
Bad input gives one clear line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from placement.placement import PlacementError
from placement.solve import METHODS, solve_placement
from placement.stats import StatsError, load_routing
from placement.topology import Topology, TopologyError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m placement", description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="routing statistics .npz (trace or moetrain stats)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=0, help="0 = all ranks on one node")
    p.add_argument("--slots-per-rank", type=int, default=0, help="0 = ceil(experts / ranks)")
    p.add_argument("--method", choices=METHODS, default="ilp")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for all layers together")
    p.add_argument("--load-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the ILP pipeline's seed (same seed, same answer)")
    p.add_argument("--inter-node-cost", type=float, default=4.0)
    p.add_argument("--out", default="", help="write the placement JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stats = load_routing(args.trace)
        topo = Topology.for_experts(stats.num_experts, args.ranks, args.slots_per_rank or None,
                                    ranks_per_node=args.ranks_per_node, inter_node_cost=args.inter_node_cost)
        topo.check_experts(stats.num_experts)
        others = [m for m in ("contiguous", "round_robin", "greedy", "local_search") if m != args.method]
        rows = []
        for method in others + [args.method]:
            tl = args.time_limit if method == args.method else max(args.time_limit / 4, 0.5)
            res = solve_placement(stats, topo, method, time_limit_s=tl, load_weight=args.load_weight, seed=args.seed)
            rows.append(res)
    except (StatsError, TopologyError, PlacementError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{stats.num_layers} layers x {stats.num_experts} experts (top-{stats.k}), "
          f"{stats.num_tokens} tokens; {topo}")
    print(f"{'method':<13}{'sends/token':>12}{'traffic':>9}{'max/mean':>9}{'objective':>10}"
          f"{'time s':>8}{'bound':>9}{'gap':>7}  solver")
    for r in rows:
        c = r.cost
        print(f"{r.method:<13}{c.sends:>12.3f}{c.traffic:>9.3f}{c.imbalance:>9.3f}{c.objective:>10.3f}"
              f"{r.solve_time_s:>8.2f}{r.bound:>9.3f}{r.gap:>7.3f}  {r.solver}/{r.status}")
    best = rows[-1]
    if args.out:
        try:
            Path(args.out).write_text(best.placement.to_json())
        except OSError as exc:
            print(f"error: cannot write --out {args.out!r}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
