"""Command line: ``python -m placement --trace PATH [--ranks 4] [--method ilp] [--out p.json]``.

Owns: argument parsing, the comparison table against the baselines, writing the placement JSON.
``--slots-per-rank``: one number for every rank, a comma list (uneven slots, e.g. 8,8,8,8,7,7,7,7)
or ``auto`` (the default): E / R when the experts divide over the ranks, else uneven slots or
``ceil(E / R)`` slots with replicas, whichever scores better on validation (select.py's
:func:`~placement.select.select_slots`). Sends per token are per layer divided by that layer's
tokens (cost.py). Bad input gives one clear line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from placement.domains import FAULT_DOMAINS
from placement.placement import PlacementError
from placement.select import select_slots
from placement.solve import METHODS, solve_placement
from placement.stats import StatsError, load_routing
from placement.topology import Topology, TopologyError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m placement", description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="routing statistics .npz (trace or moetrain stats)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=0, help="0 = all ranks on one node")
    p.add_argument(
        "--slots-per-rank", default="auto", help="N, a comma list of one N per rank, or auto (module docstring)"
    )
    p.add_argument("--method", choices=METHODS, default="ilp")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for all layers together")
    p.add_argument("--load-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the ILP pipeline's seed (same seed, same answer)")
    p.add_argument("--inter-node-cost", type=float, default=4.0)
    p.add_argument(
        "--fault-domain", choices=FAULT_DOMAINS, default="none", help="keep experts on two nodes / ranks (domains.py)"
    )
    p.add_argument("--out", default="", help="write the placement JSON here")
    return p


def _slots(text: str, num_ranks: int) -> int | tuple[int, ...] | None:
    """``--slots-per-rank``: None for auto, an int, or one int per rank."""
    if text.strip().lower() in ("auto", "0", ""):
        return None
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise PlacementError(
            f"--slots-per-rank ({text!r}) must be auto, an integer or a comma list of integers"
        ) from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) != num_ranks:
        raise PlacementError(f"--slots-per-rank has {len(vals)} entries for --ranks {num_ranks}")
    return vals


def _topology(args, stats) -> tuple[Topology, str]:
    """The topology asked for, or for auto slots with experts not dividing over the ranks, uneven
    slots vs replicas by validation (the comparison is printed)."""
    E, R = stats.num_experts, args.ranks
    spr = _slots(args.slots_per_rank, R)
    kw = dict(ranks_per_node=args.ranks_per_node, inter_node_cost=args.inter_node_cost)
    if spr is not None or R < 1 or E % R == 0:
        topo = Topology.for_experts(E, R, spr, **kw) if not isinstance(spr, tuple) else Topology(R, spr, **kw)
        topo.check_experts(E)
        return topo, ""
    method = args.method if args.method in ("ilp", "greedy", "local_search", "validated") else "greedy"
    choice = select_slots(
        stats,
        R,
        method=method,
        time_limit_s=args.time_limit,
        load_weight=args.load_weight,
        seed=args.seed,
        fault_domain=args.fault_domain,
        **kw,
    )
    scores = ", ".join(f"{n} {v:.4f}" for n, v in choice.val_scores)
    return choice.topology, (
        f"slots: {E} experts do not divide over {R} ranks; validation objective ({method}): "
        f"{scores} -> {choice.chosen} {choice.topology.slots_per_rank}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stats = load_routing(args.trace)
        topo, note = _topology(args, stats)
        others = [m for m in ("contiguous", "round_robin", "greedy", "local_search") if m != args.method]
        rows = []
        for method in others + [args.method]:
            tl = args.time_limit if method == args.method else max(args.time_limit / 4, 0.5)
            res = solve_placement(
                stats,
                topo,
                method,
                time_limit_s=tl,
                load_weight=args.load_weight,
                seed=args.seed,
                fault_domain=args.fault_domain,
            )
            rows.append(res)
    except (StatsError, TopologyError, PlacementError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{stats.num_layers} layers x {stats.num_experts} experts (top-{stats.k}), {stats.num_tokens} tokens; {topo}")
    if note:
        print(note)
    print(
        f"{'method':<13}{'sends/token':>12}{'traffic':>9}{'max/mean':>9}{'objective':>10}"
        f"{'time s':>8}{'bound':>9}{'gap':>7}  solver"
    )
    for r in rows:
        c = r.cost
        print(
            f"{r.method:<13}{c.sends:>12.3f}{c.traffic:>9.3f}{c.imbalance:>9.3f}{c.objective:>10.3f}"
            f"{r.solve_time_s:>8.2f}{r.bound:>9.3f}{r.gap:>7.3f}  {r.solver}/{r.status}"
        )
    best = rows[-1]
    per_layer = " ".join(f"{lid}:{v:.3f}" for lid, v in zip(stats.layer_ids, best.cost.sends_L))
    print(f"{best.method} sends/token per layer (each divided by that layer's tokens): {per_layer}")
    if args.fault_domain != "none":
        homed = ", ".join(f"{lid}:{list(h)}" for lid, h in zip(stats.layer_ids, best.single_homed))
        print(f"{best.method} single-homed experts per layer (fault domain {args.fault_domain}): {homed}")
    if best.method == "validated":
        print(
            f"validated: fit objective {best.fit_score:.4f}, validation objective {best.val_score:.4f} ({best.status})"
        )
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
