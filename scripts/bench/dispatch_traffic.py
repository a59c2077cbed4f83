"""Expert all-to-all bytes of flat vs hierarchical dispatch, from the dispatchers' own counters.

    PYTHONPATH=. .venv/bin/python scripts/bench/dispatch_traffic.py [--experts 64] [--top-k 8]
        [--dim 256] [--tokens 256] [--ranks 4]

On ``--ranks`` gloo processes (one torch thread each) one MoE layer dispatches, computes and
combines, forward and backward, with each mode in turn on the same tokens, for node maps
"2 nodes x R/2 ranks" and "1 + (R-1)" and for contiguous and random placements. Routing is uniform
(each token picks ``--top-k`` distinct experts at random), the olmoe-1b-7b layout by default
(64 experts, top-8). Bytes are what the ranks counted where they sent them
(``moetrain.parallel.traffic``: payload rows, int metadata, returned rows, and the gradients of
all of them in backward), summed over ranks, split by link class (inside a node / between nodes);
the baseline (flat) is measured in the same run. No network here: the "nodes" are a rank -> node
map over loopback, so this counts bytes, it does not time links (``scripts/bench/bench_multinode.py``
does, on namespace nodes). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench.scale.procs import run_ranks  # noqa: E402
from scripts.helpers import cpu_facts  # noqa: E402

MODES = ("flat", "hierarchical")


def node_maps(ranks: int) -> dict[str, tuple[int, ...]]:
    half = ranks // 2
    return {f"2x{half}": tuple([0] * half + [1] * (ranks - half)), f"1+{ranks - 1}": tuple([0] + [1] * (ranks - 1))}


def _rank_job(ctx, args: dict) -> dict:
    import torch

    from moetrain.model.moe.experts import GroupedExperts
    from moetrain.parallel.dispatcher import AllToAllDispatcher
    from moetrain.parallel.hierarchical import HierarchicalDispatcher
    from moetrain.parallel.traffic import TrafficCounter
    from placement.placement import Placement

    E, K, D, T, R = args["experts"], args["top_k"], args["dim"], args["tokens"], ctx.world_size
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, requires_grad=True)
    out = {}
    for kind in ("contiguous", "random"):
        p = Placement.contiguous(1, E, R) if kind == "contiguous" else Placement.random(1, E, R, seed=1)
        experts = GroupedExperts(p.local_experts(0, ctx.rank), D, args["ffn"], seed=1, layer_index=0, init_std=0.1)
        for name, node_R in node_maps(R).items():
            c = dataclasses.replace(ctx, node_R=node_R)
            for mode, cls in zip(MODES, (AllToAllDispatcher, HierarchicalDispatcher)):
                counter = TrafficCounter(ctx.rank, R, node_R, num_layers=1)
                disp = cls(p, 0, c, tally=counter.layer(0))
                x_ND, meta = disp.dispatch(x, ids, w)
                disp.combine(experts(x_ND, meta.tokens_per_slot), meta).sum().backward()
                out[(kind, name, mode)] = counter.decode(counter.drain()).a2a_LPC[0].sum(0).tolist()
    return out


def measure(experts: int = 64, top_k: int = 8, dim: int = 256, tokens: int = 256, ranks: int = 4,
            ffn: int = 64) -> dict:
    args = dict(experts=experts, top_k=top_k, dim=dim, tokens=tokens, ffn=ffn)
    per_rank = run_ranks(_rank_job, ranks, args)
    rows = []
    for key in per_rank[0]:
        if key[2] != "flat":
            continue
        flat = [sum(r[key][i] for r in per_rank) for i in range(2)]
        hier = [sum(r[(key[0], key[1], "hierarchical")][i] for r in per_rank) for i in range(2)]
        rows.append({"placement": key[0], "nodes": key[1], "flat_intra": flat[0], "flat_inter": flat[1],
                     "hier_intra": hier[0], "hier_inter": hier[1], "inter_hier_vs_flat": hier[1] / flat[1],
                     "total_hier_vs_flat": sum(hier) / sum(flat)})
    return {"experts": experts, "top_k": top_k, "dim": dim, "tokens_per_rank": tokens, "ranks": ranks,
            "rows": rows, **cpu_facts()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    ap.add_argument("--ranks", type=int, default=4)
    a = ap.parse_args(argv)
    if a.ranks < 2 or not 1 <= a.top_k <= a.experts or a.experts % a.ranks:
        ap.error(f"need --ranks >= 2, 1 <= --top-k <= --experts, and --experts divisible by --ranks "
                 f"(got {a.ranks}, {a.top_k}, {a.experts})")
    res = measure(a.experts, a.top_k, a.dim, a.tokens, a.ranks)
    print(f"expert all-to-all bytes (forward + backward, all ranks), E={a.experts} top-{a.top_k} D={a.dim} "
          f"{a.tokens} tokens/rank, uniform routing")
    print(f"{'placement':<11} {'nodes':<6} {'flat intra':>12} {'flat inter':>12} {'hier intra':>12} "
          f"{'hier inter':>12} {'inter h/f':>9} {'total h/f':>9}")
    for r in res["rows"]:
        print(f"{r['placement']:<11} {r['nodes']:<6} {r['flat_intra']:>12,.0f} {r['flat_inter']:>12,.0f} "
              f"{r['hier_intra']:>12,.0f} {r['hier_inter']:>12,.0f} {r['inter_hier_vs_flat']:>9.3f} "
              f"{r['total_hier_vs_flat']:>9.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
