"""Elastic training under node failures: recovery from memory vs checkpoint-restart (issue #25).

On a multi-node Ray on this machine (``ray.cluster_utils.Cluster``: a head with no CPUs and two
worker nodes), the same model and failure schedule for every arm: 4 ranks, 2 per node; the node
holding rank 3 is killed (every process at once) at steps ``--kill-at`` (a kill falls due at
its step and happens at the first step after it where the group has its 4 ranks again, so every
arm lives the same failures: ``same_failures``) and a fresh node joins ``--back-after`` steps
later. All arms are elastic (``cluster.min_workers=2``): after a loss they go on with the 2 ranks
that fit and grow back when the node returns; they differ in where the lost state comes from:

- ``memory``: every expert on both nodes (``slots_per_rank`` = E/2, ``placement.fault_domain=node``):
  the survivors' state, no checkpoint read, no completed step redone;
- ``checkpoint``: contiguous experts (no replicas) and checkpoint-restart at its best: the
  checkpoint interval set by the Young-Daly optimum sqrt(2 x C x MTBF), with C the checkpoint
  stall measured in a first run without failures and MTBF the wall time between kills as the
  memory arm lived the schedule.

Measured per arm: recovery time (the kill -> training past the furthest step reached before it),
steps redone, goodput (useful steps per minute over the failure schedule, from the first step
done to the last; also over the whole run, the group's first start included). Steady state (runs
without failures, 4 ranks): the median step with replicas under ``fault_domain=node``, the same
replicas with ``fault_domain=none`` (``fault_domain_step_cost``: the rule's cost) and no replicas
(``replication_step_cost``). The invariant (``final_params_equal_uninterrupted``): per arm, the
node of rank 3 lost at step 10 of 30 and the run ends with the parameters and AdamW moments of
the same run without the loss (1e-5); over the long schedule the two drift apart (groups of
different sizes sum in different orders and a router's near-tie can flip a top-k choice), which
is reported as ``long_schedule_max_rel_diff``. Prints a table and one JSON line (recorded to
results/elastic.jsonl).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench import results  # noqa: E402
from scripts.bench.elastic_nodes import SYSTEM_CONFIG, LocalNodes, NetNodes  # noqa: E402
from scripts.helpers import cpu_facts, log  # noqa: E402

SCHEMA = results.Schema(
    "elastic",
    "elastic training under node failures: recovery from memory vs checkpoint-restart (Young-Daly interval)",
    targets=(
        results.Target("recovery_speedup", ">=", 5.0, "x", "recovery time, checkpoint-restart / from memory"),
        results.Target("steps_lost_memory", "==", 0, "", "completed steps redone after a loss, from memory"),
        results.Target(
            "goodput_ratio_elastic_vs_restart", ">=", 2.0, "x", "useful steps per minute, memory / checkpoint"
        ),
        results.Target(
            "final_params_equal_uninterrupted",
            "==",
            "true",
            "",
            "final parameters equal the run without failures (1e-5)",
            met_key="final_params_equal_uninterrupted",
        ),
    ),
    keys=(
        "single_homed_experts",
        "fault_domain_step_cost",
        "replication_step_cost",
        "steady_median_step_s",
        "goodput_ratio_whole_run",
        "same_failures",
        "median_step_s",
        "recovery_s_memory",
        "recovery_s_checkpoint",
        "steps_lost_checkpoint",
        "checkpoint_every",
        "checkpoint_cost_s",
        "mtbf_s",
        "step_s",
        "arms",
        "cpu",
        "avx512_bf16",
        "amx_bf16",
    ),
)

MODEL = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "ffn_dim": 128,
    "max_seq_len": 32,
    "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 64},
}


def config(
    work: Path,
    name: str,
    steps: int,
    *,
    replicas: bool,
    every: int,
    workers: int = 4,
    min_workers: int = 2,
    fault_domain: str = "node",
):
    from moetrain.config import from_dict, validate

    cluster = {
        "num_workers": workers,
        "min_workers": min_workers,
        "run_name": name,
        "max_failures": 8,
        "resize_check_s": 0.5,
        "node_wait_s": 60,
        "step_timeout_s": 60,
        "start_timeout_s": 120,
        "dashboard": False,
    }
    # memory arm: two copies of every expert, on two nodes (placement.fault_domain=node)
    placement = {"slots_per_rank": MODEL["moe"]["num_experts"] // 2, "fault_domain": fault_domain} if replicas else {}
    return validate(
        from_dict(
            {
                "model": MODEL,
                "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 300_000},
                "train": {
                    "steps": steps,
                    "global_batch_size": 16,
                    "warmup_steps": 2,
                    "eval_every": 0,
                    "log_every": 1000,
                },
                "checkpoint": {"uri": str(work / "ckpt"), "every": every, "keep": 3},
                "cluster": cluster,
                "placement": placement,
                "logging": {"wandb": "disabled", "out_dir": str(work / "out"), "progress": False},
            }
        )
    )


def run_arm(nodes: "LocalNodes | NetNodes", c, kill_at: list[int], back_after: int) -> dict:
    """One run under the failure schedule: step times, recoveries, the summary."""
    from cluster.api import run

    times: dict[int, float] = {}
    kills: list[tuple[int, float]] = []  # (furthest step before the kill, time of the kill)
    back_due: list[int] = []

    due = list(kill_at)  # a kill is due at its step, or later: once the group has 4 ranks again

    def on_step(m):
        now = time.perf_counter()
        times.setdefault(m.step, now)  # a redone step counts when first reached
        furthest = max(times)
        if (
            due
            and m.step >= due[0]
            and m.step == furthest
            and m.world_size == 4
            and nodes.kill_node_of(c.cluster.run_name, 3, 4)
        ):
            kills.append((furthest, time.perf_counter()))
            back_due.append(m.step + back_after)
            due.pop(0)
        if back_due and m.step >= back_due[0]:
            back_due.pop(0)
            nodes.bring_back()  # in the background: the node returns while training goes on

    t0 = time.perf_counter()
    result = run(c, on_step=on_step, raise_on_failure=False)
    wall = time.perf_counter() - t0
    first, last = min(times.values()), max(times.values())  # the schedule: first step done -> last
    recoveries = []
    for furthest, t_kill in kills:
        nxt = [t for s, t in times.items() if s > furthest and t > t_kill]
        recoveries.append(min(nxt) - t_kill if nxt else float("nan"))
    s = result.summary
    return {
        "state": result.state.value,
        "wall_s": wall,
        "schedule_s": last - first,
        "kills": [s for s, _ in kills],
        "steps": s.get("steps"),
        "recoveries_s": recoveries,
        "kill_times": [t - t0 for _, t in kills],
        "steps_redone": sum(e["steps_lost"] for e in s.get("resizes", [])),
        "resizes": s.get("resizes", []),
        "history_steps": [h.step for h in result.history],
        "losses": [h.loss for h in result.history],
        "step_times": [h.step_time_s for h in result.history],
    }


def single_homed_counts() -> dict:
    """Experts per layer left on one node with placement.fault_domain=node, for this benchmark's
    layout (8 experts, 2 nodes x 2 ranks) at 1 and 2 spare slots per rank: what the slots allow."""
    import numpy as np

    from placement.domains import max_multi_homed

    E, R = MODEL["moe"]["num_experts"], 4
    nodes = np.array([0, 0, 1, 1])
    return {f"spare_{k}": E - max_multi_homed((E // R + k,) * R, nodes, E) for k in (1, 2)}


def final_state(c) -> dict:
    from moetrain.checkpoint import load_objects, read_manifest, resolve

    ref = resolve("latest", c.checkpoint, run=c.cluster.run_name)
    manifest = read_manifest(ref)
    return load_objects(ref, [n for n in manifest.names if not n.startswith("rng/")], manifest=manifest)


def _pairs(a: dict, b: dict):
    """(name, tensor of a, tensor of b) for every tensor of two checkpoints' objects (float64);
    None when they do not hold the same objects."""
    import torch

    def flat(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from flat(v, f"{path}/{k}")
        elif torch.is_tensor(obj):
            yield path, obj.double()

    if a.keys() != b.keys():
        return None
    out = []
    for name in a:
        fa, fb = dict(flat(a[name])), dict(flat(b[name]))
        out += [(name + k, fa[k], fb[k]) for k in fa]
    return out


def allclose_excess(a: dict, b: dict) -> float:
    """max |a - b| / (1e-6 + 1e-5 |b|) over every tensor: <= 1 is the tests' equality (rtol 1e-5,
    atol 1e-6)."""
    pairs = _pairs(a, b)
    if pairs is None:
        return float("inf")
    return max(((x - y).abs() / (1e-6 + 1e-5 * y.abs())).max().item() for _, x, y in pairs)


def max_rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max |a - b| / max |b|."""
    pairs = _pairs(a, b)
    if pairs is None:
        return float("inf")
    return max((x - y).abs().max().item() / max(y.abs().max().item(), 1e-6) for _, x, y in pairs)


EQ_STEPS, EQ_KILL = 30, 10  # the invariant: a node lost at step 10 of 30


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--kill-at", default="10,60", help="steps after which the node of rank 3 is killed")
    ap.add_argument("--back-after", type=int, default=4, help="steps after a kill until a new node joins")
    ap.add_argument("--quick", action="store_true", help="12 steps, one kill at step 5 (smoke run; not recorded)")
    ap.add_argument("--work-dir", default="")
    ap.add_argument(
        "--cluster",
        choices=("auto", "netns", "local"),
        default="auto",
        help="netns: Ray nodes in network namespaces (scripts/tools/netcluster.py); local: "
        "ray.cluster_utils.Cluster; auto: netns where this machine allows it",
    )
    ap.add_argument("--attach", default="", help=argparse.SUPPRESS)  # (inside the netcluster: its id)
    results.add_flag(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.kill_at, args.back_after = 12, "5", 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.attach and want_netns(args.cluster):
        return in_netcluster(list(sys.argv[1:] if argv is None else argv), args.work_dir)
    kill_at = [int(k) for k in args.kill_at.split(",") if k]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-elastic-"))
    work.mkdir(parents=True, exist_ok=True)
    nodes = NetNodes(args.attach) if args.attach else LocalNodes()
    try:
        m = measure(nodes, args, work, kill_at)
        eq_steps, eq_kill = min(EQ_STEPS, args.steps), min(EQ_KILL, kill_at[0])
        m["equality"] = {
            name: equality(nodes, work, name, replicas, m["every"], eq_steps, eq_kill)
            for name, replicas in (("memory", True), ("checkpoint", False))
        }
        m["eq_steps"], m["eq_kill"] = eq_steps, eq_kill
    finally:
        nodes.close()
    payload = payload_of(m, args, kill_at, nodes.kind)
    report(payload, m)
    results.record(SCHEMA, payload, args)
    return 0


def measure(nodes, args, work: Path, kill_at: list[int]) -> dict:
    """The reference run (step time, checkpoint cost), both arms under the schedule and the
    steady-state runs; every arm starts on its full size."""
    log("uninterrupted run (2 ranks, contiguous): the step time, the checkpoint cost")
    ref_cfg = config(work / "ref", "ref", args.steps, replicas=False, every=1, workers=2, min_workers=0)
    with StallLog() as stalls:
        ref = run_arm(nodes, ref_cfg, [], 0)
    step_s = sorted(ref["step_times"])[len(ref["step_times"]) // 2]
    cost_s = max(sum(stalls.values) / max(len(stalls.values), 1), 1e-4)
    arms: dict = {}
    steady: dict = {}
    mtbf_s, every = float("nan"), 1
    for name, replicas in (("memory", True), ("checkpoint", False)):
        if name == "checkpoint":  # MTBF: the wall time between kills of the schedule, as the memory arm lived it
            kt = arms["memory"]["kill_times"]
            mtbf_s = (kt[-1] - kt[0]) / (len(kt) - 1) if len(kt) > 1 else arms["memory"]["wall_s"]
            every = max(1, round(math.sqrt(2 * cost_s * mtbf_s) / step_s))
            log(f"median step {step_s:.3f} s, checkpoint cost {cost_s:.4f} s, MTBF {mtbf_s:.1f} s -> every {every}")
        nodes.reset()
        c = config(work / name, name, args.steps, replicas=replicas, every=every if not replicas else args.steps)
        log(f"arm {name}")
        arms[name] = run_arm(nodes, c, kill_at, args.back_after)
        final = final_state(c)
        nodes.reset()  # the same run without failures: its steady state, and how far the long run drifted
        u = config(work / f"{name}-u", f"{name}-u", args.steps, replicas=replicas, every=args.steps)
        steady[name] = sorted(run_arm(nodes, u, [], 0)["step_times"])
        arms[name]["long_schedule_max_rel_diff"] = max_rel_diff(final, final_state(u))
    nodes.reset()  # the same replicas without the fault-domain rule: its steady-state cost
    u = config(work / "none-u", "none-u", args.steps, replicas=True, every=args.steps, fault_domain="none")
    steady["fault_domain_none"] = sorted(run_arm(nodes, u, [], 0)["step_times"])
    steady["fault_domain_node"], steady["no_replicas"] = steady.pop("memory"), steady.pop("checkpoint")
    return {"arms": arms, "steady": steady, "every": every, "cost_s": cost_s, "mtbf_s": mtbf_s, "step_s": step_s}


def equality(nodes, work: Path, name: str, replicas: bool, every: int, steps: int, kill: int) -> dict:
    """The invariant: the node of rank 3 lost at step ``kill`` of ``steps`` (recovered from memory,
    or the checkpoint every ``every`` steps), the run ends with the parameters and AdamW moments
    of the same run without the loss (1e-5). Over long schedules the two drift apart: the groups
    of different sizes sum in different orders, and a router's near-tie can flip a top-k choice."""
    nodes.reset()
    c = config(work / f"eq-{name}", f"eq-{name}", steps, replicas=replicas, every=every if not replicas else steps)
    arm = run_arm(nodes, c, [kill], steps)  # (the node does not come back within the run)
    nodes.reset()
    u = config(work / f"eq-{name}-u", f"eq-{name}-u", steps, replicas=replicas, every=steps)
    run_arm(nodes, u, [], 0)
    a, b = final_state(c), final_state(u)
    return {
        "state": arm["state"],
        "kills": arm["kills"],
        "resizes": [(e["why"], e["step"], e["from_ranks"], e["to_ranks"]) for e in arm["resizes"]],
        "allclose_excess": allclose_excess(a, b),
        "max_rel_diff": max_rel_diff(a, b),
    }


def payload_of(m: dict, args, kill_at: list[int], cluster: str) -> dict:
    arms, steady = m["arms"], m["steady"]
    mem, ck = arms["memory"], arms["checkpoint"]
    steady_median = {k: v[len(v) // 2] for k, v in steady.items()}
    rec_m = sum(mem["recoveries_s"]) / max(len(mem["recoveries_s"]), 1)
    rec_c = sum(ck["recoveries_s"]) / max(len(ck["recoveries_s"]), 1)
    # goodput over the failure schedule (first step done -> last step done), and over the whole
    # run (with the group's first start, the same in both arms)
    goodput = {k: 60 * (args.steps - 1) / a["schedule_s"] for k, a in arms.items()}
    goodput_run = {k: 60 * args.steps / a["wall_s"] for k, a in arms.items()}
    eq = m["equality"]
    return {
        "recovery_s_memory": rec_m,
        "recovery_s_checkpoint": rec_c,
        "recovery_speedup": rec_c / rec_m,
        "steps_lost_memory": mem["steps_redone"],
        "steps_lost_checkpoint": ck["steps_redone"],
        "goodput_steps_per_min": goodput,
        "goodput_ratio_elastic_vs_restart": goodput["memory"] / goodput["checkpoint"],
        "goodput_steps_per_min_whole_run": goodput_run,
        "goodput_ratio_whole_run": goodput_run["memory"] / goodput_run["checkpoint"],
        "same_failures": all(len(a["kills"]) == len(kill_at) for a in arms.values()),
        "final_params_equal_uninterrupted": all(
            e["allclose_excess"] <= 1.0 and e["state"] == "finished" and e["kills"] for e in eq.values()
        ),
        "equality": eq,
        "equality_schedule": f"node of rank 3 lost at step {m['eq_kill']} of {m['eq_steps']}",
        "single_homed_experts": single_homed_counts(),
        "median_step_s": {k: sorted(a["step_times"])[len(a["step_times"]) // 2] for k, a in arms.items()},
        "steady_median_step_s": steady_median,
        "fault_domain_step_cost": steady_median["fault_domain_node"] / steady_median["fault_domain_none"] - 1,
        "replication_step_cost": steady_median["fault_domain_node"] / steady_median["no_replicas"] - 1,
        "checkpoint_every": m["every"],
        "checkpoint_cost_s": m["cost_s"],
        "mtbf_s": m["mtbf_s"],
        "step_s": m["step_s"],
        "kill_at": kill_at,
        "back_after": args.back_after,
        "steps": args.steps,
        "arms": {
            k: {kk: v for kk, v in a.items() if kk not in ("step_times", "history_steps", "losses")}
            for k, a in arms.items()
        },
        "cluster": cluster,
        **cpu_facts(),
    }


def report(p: dict, m: dict) -> None:
    print(f"{'arm':<12} {'state':<9} {'wall s':>7} {'recovery s':>14} {'redone':>7} {'steps/min':>10}")
    for k, a in m["arms"].items():
        rec = ", ".join(f"{r:.1f}" for r in a["recoveries_s"])
        print(
            f"{k:<12} {a['state']:<9} {a['wall_s']:>7.1f} {rec:>14} {a['steps_redone']:>7} "
            f"{p['goodput_steps_per_min'][k]:>10.1f}"
        )
    for k, a in m["arms"].items():
        for e in a["resizes"]:
            print(
                f"  {k}: {e['why']} at step {e['step']}: {e['from_ranks']} -> {e['to_ranks']} ranks from "
                f"{e['source'].rsplit('/', 2)[-1]}, {e['seconds']:.1f} s to a ready group, {e['steps_lost']} redone"
            )
    print(
        f"recovery speedup {p['recovery_speedup']:.2f}x, goodput ratio "
        f"{p['goodput_ratio_elastic_vs_restart']:.2f}x over the schedule "
        f"({p['goodput_ratio_whole_run']:.2f}x over the whole run, first start included; same failures in "
        f"both arms: {p['same_failures']}); checkpoint every {p['checkpoint_every']} step(s) "
        f"(cost {p['checkpoint_cost_s']:.4f} s, MTBF {p['mtbf_s']:.1f} s); {p['cluster']}; {p['cpu']}"
    )
    for k, e in p["equality"].items():
        print(
            f"{p['equality_schedule']}, {k}: {e['state']}, {e['resizes']}, vs the run without it: allclose "
            f"excess {e['allclose_excess']:.3f} (<= 1: equal at rtol 1e-5), max rel diff {e['max_rel_diff']:.2e}"
        )
    print(
        "steady-state median step, 4 ranks: "
        + ", ".join(f"{k} {v:.4f} s" for k, v in p["steady_median_step_s"].items())
        + f" -> fault-domain rule {p['fault_domain_step_cost']:+.1%}, "
        f"replication {p['replication_step_cost']:+.1%}"
    )
    print(json.dumps(p))


def want_netns(choice: str) -> bool:
    from scripts.tools import netcluster

    reason = netcluster.unavailable_reason()
    if choice == "netns" and reason:
        raise SystemExit(f"bench_elastic: --cluster netns: {reason}")
    return choice == "netns" or (choice == "auto" and reason is None)


def in_netcluster(argv: list[str], work_dir: str) -> int:
    """Build the netcluster (2 Ray nodes x 2 CPUs, fast node-death detection as the local
    cluster has), run this benchmark as the driver in the head's namespace, take it down."""
    from scripts.tools import netcluster

    nc = netcluster.NetCluster(nodes=2, cpus_per_node=2, system_config=SYSTEM_CONFIG)
    info = nc.up()
    log(f"netcluster {info.id}: {', '.join(f'{n.name} {n.address}' for n in info.ray_nodes())}")
    try:
        work = work_dir or tempfile.mkdtemp(prefix="bench-elastic-")
        inner = _without(argv, ("--cluster", "--work-dir")) + ["--cluster", "netns", "--attach", info.id]
        inner += ["--work-dir", work]
        p = nc.run(info.head.name, [sys.executable, "-m", "scripts.bench.bench_elastic", *inner], timeout=3600)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr[-20000:])
        return p.returncode
    finally:
        nc.down()


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less ``options`` (``--opt VALUE`` and ``--opt=VALUE``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in options)):
            out.append(a)
    return out


class StallLog(logging.Handler):
    """The training stall of each committed checkpoint, read off the run's log lines
    (``checkpoint step N committed: ... stall X s``): the checkpoint cost C of Young-Daly."""

    def __init__(self):
        super().__init__()
        self.values: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"committed: .*stall ([0-9.]+) s", record.getMessage())
        if m:
            self.values.append(float(m.group(1)))

    def __enter__(self) -> "StallLog":
        logging.getLogger("moetrain").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("moetrain").removeHandler(self)


if __name__ == "__main__":
    sys.exit(main())
