"""Benchmark: moetrain across Ray nodes with their own addresses and rate-limited links
(scripts/tools/netcluster.py network namespaces on this machine).

    sudo .venv/bin/python scripts/bench/bench_multinode.py            # full: ~35 min on 2 shared cores
    sudo .venv/bin/python scripts/bench/bench_multinode.py --quick    # 2 x 2 at 100 Mbit/s, few steps: ~10-17 min

Model: the olmoe-1b-7b-mini layout with fine-grained routing restored to OLMoE's 64 experts,
top-8, shrunk to fit 2 cores (width 128, 2 MoE layers). Steps:
1. warm: flat dispatch, contiguous placement, ``--warm-steps`` steps on unlimited links, so the
   routing is the model's own; the checkpoint goes to a local folder (every namespace sees this
   machine's file system) and the routing statistics to routing.npz.
2. placements from that routing (scripts/bench/netbench/plan.py): contiguous and the topology-aware ILP
   per layout, with the ILP's proven bound and the exact optimum where placement/exact.py applies.
3. arms, each resumed from the warm checkpoint and timed over ``--timed-steps`` steps, for every
   layout (2 nodes x 2 ranks, 4 x 1) and link rate (100 Mbit/s, 1 Gbit/s, tbf both directions):
   flat+contiguous, flat+ILP, hierarchical+contiguous, hierarchical+node-level ILP (when the
   checkout has ``model.moe.dispatch``; not on 4 x 1, where it sends what flat sends), and the
   DeepSpeed-MoE peer (scripts/bench/netbench/ds_peer.py); ``--rounds`` times in reversed order, an
   arm's step time its fastest round's. Bytes are the interfaces' counters over exactly the timed
   steps, beside the run's own counts by kind. An arm that fails is listed in ``arm_errors``.
4. node loss: a run checkpointing to S3 every few steps loses node n1 (all its processes
   SIGKILLed); its Ray comes back; the run must finish from the last committed checkpoint, and
   every committed checkpoint must verify.
Prints a table and one JSON line (ratios and targets, CPU model and flags). Needs root and
``ip netns`` (else one line, exit 2). Keys that need code this checkout lacks are listed under
``missing`` with the reason, never filled in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench import results  # noqa: E402
from scripts.bench.netbench import report  # noqa: E402
from scripts.tools import netcluster  # noqa: E402
from scripts.tools.netcluster import S3_ENV, NetCluster  # noqa: E402

PY = str(netcluster.VENV_BIN / "python")
BUCKET = "bench"
S3_PORT = 9100
DS_PORT = 29511
DS_TIMEOUT_S = 900  # one DeepSpeed peer run, setup included
MODEL = ["model.moe.num_experts=64", "model.moe.top_k=8", "model.dim=128", "model.n_layers=2", "model.n_heads=4",
         "model.ffn_dim=256", "model.moe.expert_ffn_dim=64", "train.global_batch_size=32", "train.eval_every=0",
         "train.log_every=1", "data.vocab_size=1024", "logging.wandb=disabled", "logging.progress=false", "train.warmup_steps=5"]
LAYOUTS = {"2x2": (2, 2), "4x1": (4, 1)}  # nodes x ranks per node
TARGETS = {"internode_bytes_hier_vs_flat": ("<=", 0.6), "internode_bytes_topo_vs_contiguous": ("<=", 0.8),
           "step_speedup_best_vs_flat_contiguous_100mbit": (">=", 1.5), "counted_vs_interface_bytes": ("in", (0.9, 1.1)),
           "node_loss_recovered": ("==", True), "node_loss_recovery_s": ("<=", 60.0),
           "committed_checkpoints_corrupted": ("==", 0)}

NODE_LOSS_KEYS = ("node_loss_recovered", "node_loss_recovery_s", "committed_checkpoints_corrupted")

SCHEMA = results.Schema(
    "multinode", "2 nodes x 2 ranks (and 4 x 1) in network namespaces, rate-limited links: dispatch x placement arms "
    "and DeepSpeed-MoE's flat all-to-all",
    keys=("cpu_model", "arms", "placements"),
    # the benchmark judges its own targets (report.summarize: "in" ranges, booleans): met_key
    # (--no-node-loss leaves the node-loss keys out: optional)
    targets=tuple(results.Target(k, "==", f"{op} {value}", "", k.replace("_", " "), met_key=f"targets.{k}.met",
                                 optional=k in NODE_LOSS_KEYS)
                  for k, (op, value) in TARGETS.items()) + (
        results.Target("step_speedup_best_vs_deepspeed_100mbit", ">=", 1.5, "x", "best arm vs DeepSpeed-MoE, 100 Mbit/s "
                       "(a goal, reported)", optional=True),))


def has_dispatch_modes() -> bool:
    from moetrain.config import MoEConfig
    return "dispatch" in MoEConfig.__dataclass_fields__


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.nc: NetCluster | None = None
        self.s3 = ""
        self.warm_uri = ""
        self.log = open(self.work / "bench.log", "a")
        self.errors: dict[str, str] = {}  # arm -> why it produced no result

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        self.log.write(msg + "\n")
        self.log.flush()

    # ---- cluster ---------------------------------------------------------------------------
    def cluster(self, nodes: int, cpus: int) -> NetCluster:
        if self.args.attach:  # a cluster someone else owns (the smoke test's): used, never taken down
            self.nc = netcluster.attach(self.args.attach)
            info = self.nc.info
            if len(info.ray_nodes()) != nodes or info.cpus_per_node != cpus or not [n for n in info.nodes if not n.ray]:
                raise SystemExit(f"bench_multinode: cluster {info.id} is not {nodes} nodes x {cpus} CPUs + a client")
        else:
            if self.nc is not None:
                self.nc.down()
            self.nc = NetCluster(nodes=nodes, cpus_per_node=cpus, clients=1, env=S3_ENV)
            info = self.nc.up()
        self.s3 = self.nc.start_s3("c0", BUCKET, port=S3_PORT)
        self.say(f"cluster {info.id}: {nodes} node(s) x {cpus} CPU, head {info.ray_address}, S3 {self.s3}")
        return self.nc

    def base(self, run: str, workers: int, steps: int) -> list[str]:
        info = self.nc.info
        return MODEL + [f"cluster.address={info.ray_address}", f"cluster.num_workers={workers}",
                        f"cluster.run_name={run}", f"train.steps={steps}", f"logging.out_dir={self.work / 'runs'}",
                        f"storage.s3_endpoint={self.s3}"]

    def spec(self, run: str, overrides: list[str], timed_from: int) -> Path:
        info = self.nc.info
        spec = {"config": "olmoe-1b-7b-mini", "overrides": overrides, "bridge_netns": info.bridge_netns,
                "links": {n.name: n.peer_ifname for n in info.ray_nodes()}, "timed_from": timed_from}
        path = self.work / f"{run}.spec.json"
        path.write_text(json.dumps(spec))
        return path

    def run_arm(self, run: str, overrides: list[str], timed_from: int, timeout_s: float = 1800) -> dict:
        spec, out = self.spec(run, overrides, timed_from), self.work / f"{run}.out.json"
        out.unlink(missing_ok=True)
        p = self.nc.run("n0", [PY, "-m", "scripts.bench.netbench.arm", str(spec), str(out)], timeout=timeout_s)
        (self.work / f"{run}.log").write_text(p.stdout + p.stderr)
        if not out.exists():
            raise RuntimeError(f"arm {run} wrote no result (exit {p.returncode}): {(p.stderr or p.stdout)[-1500:]}")
        res = json.loads(out.read_text())
        if res["state"] != "finished":
            raise RuntimeError(f"arm {run} ended {res['state']}: {res['error'][:1500]}")
        return res

    # ---- phases ----------------------------------------------------------------------------
    def warm(self) -> Path:
        a = self.args
        self.nc.set_rate(0)
        ov = self.base("warm", 4, a.warm_steps) + [f"checkpoint.uri={self.work / 'ckpt'}", "checkpoint.fsync=false",
                                                   "checkpoint.overwrite=true"]
        t0 = time.monotonic()
        res = self.run_arm("warm", ov, timed_from=a.warm_steps)
        self.warm_uri = f"{self.work / 'ckpt'}/warm/step-{a.warm_steps}"
        self.say(f"warm: {a.warm_steps} steps in {time.monotonic() - t0:.0f} s, loss "
                 f"{res['steps'][0]['loss']:.3f} -> {res['steps'][-1]['loss']:.3f}")
        return self.work / "runs" / "warm" / "routing.npz"

    def arm(self, layout: str, rate: float, dispatch: str, placement: str, paths: dict, k: int = 0) -> dict:
        a = self.args
        nodes, rpn = LAYOUTS[layout]
        run = f"{layout}-{rate:g}-{dispatch}-{placement}-r{k}"
        ov = self.base(run.replace(".", "_"), nodes * rpn, a.warm_steps + a.skip_steps + a.timed_steps)
        ov += [f"checkpoint.resume={self.warm_uri}", f"placement.initial={paths[placement]}"]
        if dispatch != "flat" or has_dispatch_modes():
            ov.append(f"model.moe.dispatch={dispatch}")
        self.nc.set_rate(rate)
        res = self.run_arm(run.replace(".", "_"), ov, timed_from=a.warm_steps + a.skip_steps)
        row = report.arm_row(layout, rate, dispatch, placement, res, self.nc.info)
        self.say(report.row_text(row))
        return row

    def rounds(self, layout: str, rate: float, jobs: list[tuple[str, str]], paths: dict) -> list[dict]:
        """Every arm ``--rounds`` times, the order reversed each round (the machine's load drifts:
        each arm sees early and late slots); an arm's step time is its fastest round's."""
        runs: dict[tuple[str, str], list[dict]] = {}
        for k in range(self.args.rounds):
            for dispatch, placement in (jobs if k % 2 == 0 else jobs[::-1]):
                try:
                    row = (self.deepspeed_peer(layout, rate, k) if dispatch == "deepspeed"
                           else self.arm(layout, rate, dispatch, placement, paths, k))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # one arm's failure loses no other
                    self.errors[f"{layout}/{rate:g}/{dispatch}+{placement}/r{k}"] = str(exc)[:400]
                    self.say(f"arm failed: {str(exc)[:400]}")
                    continue
                runs.setdefault((dispatch, placement), []).append(row)
        out = []
        for job in [j for j in jobs if j in runs]:
            best = dict(min(runs[job], key=lambda r: r["step_s"]))
            best["step_s_rounds"] = [r["step_s"] for r in runs[job]]
            out.append(best)
        return out

    def deepspeed_peer(self, layout: str, rate: float, k: int = 0) -> dict:
        """DeepSpeed-MoE (flat all-to-all) on the same nodes and links: one process per rank,
        spawned in its node's namespace, gloo over the nodes' addresses. A rank that fails makes
        the others fail at their next collective (gloo timeout), so all are waited for."""
        a = self.args
        nodes, rpn = LAYOUTS[layout]
        info = self.nc.info
        tag = f"ds-{layout}-{rate:g}-r{k}"
        port = DS_PORT + k + (10 if rate >= 1000 else 0)
        out = self.work / f"{tag}.out.json"
        out.unlink(missing_ok=True)
        spec = {"experts": 64, "top_k": 8, "dim": 128, "expert_ffn": 64, "layers": 2, "heads": 4, "vocab": 1024,
                "seq": 128, "tokens_per_rank": 32 * 128 // (nodes * rpn), "capacity_factor": a.ds_capacity_factor,
                "warmup": a.skip_steps + 1, "steps": a.timed_steps, "bridge_netns": info.bridge_netns,
                "links": {n.name: n.peer_ifname for n in info.ray_nodes()}, "out": str(out)}
        path = self.work / f"{tag}.spec.json"
        path.write_text(json.dumps(spec))
        self.nc.set_rate(rate)
        procs = []
        for r in range(nodes * rpn):
            node = info.ray_nodes()[r // rpn]
            env = {"RANK": str(r), "WORLD_SIZE": str(nodes * rpn), "LOCAL_RANK": str(r % rpn), "LOCAL_SIZE": str(rpn),
                   "MASTER_ADDR": info.head.address, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   # what a DeepSpeed user sets on each host (moetrain binds gloo itself)
                   "GLOO_SOCKET_IFNAME": node.ifname}
            procs.append(self.nc.spawn(node.name, [PY, "-m", "scripts.bench.netbench.ds_peer", str(path)],
                                       self.work / f"{tag}-rank{r}.log", env=env))
        try:
            deadline = time.monotonic() + DS_TIMEOUT_S
            rcs = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        finally:
            for p in procs:  # a hung peer (seen once: 4 x 1 ranks idle in setup) is ended
                if p.poll() is None:
                    p.kill()
            from scripts.bench.bench_ep.ds_baseline import release_deepspeed_shm
            release_deepspeed_shm(port)  # DeepSpeed never unlinks its /dev/shm buffers
        if any(rcs) or not out.exists():
            tail = (self.work / f"{tag}-rank0.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"DeepSpeed peer {layout} at {rate:g} Mbit/s: exit codes {rcs}: {tail}")
        res = json.loads(out.read_text())
        n = res["steps"]
        row = {"layout": layout, "rate_mbit": rate, "dispatch": "deepspeed", "placement": "contiguous",
               "step_s": res["seconds"] / n, "step_s_median": sorted(res["step_times"])[n // 2],
               "internode_bytes_per_step": sum(v["sent"] for v in res["links"].values()) / n,
               "sent_per_node": {k: v["sent"] / n for k, v in res["links"].items()},
               "rank_nodes": [f"n{r // rpn}" for r in range(nodes * rpn)], "ranks_node_contiguous": True,
               "offrank_rows_per_step": None, "counted": {}, "loss_last": None}
        self.say(report.row_text(row))
        return row

    def node_loss(self) -> dict:
        """Kill n1 mid-run, bring its Ray back, and check the run finishes from S3 checkpoints."""
        a = self.args
        steps, every, kill_at = a.loss_steps, a.loss_every, a.loss_kill_step
        self.nc.set_rate(1000)
        ov = self.base("loss", 4, steps) + [f"checkpoint.uri=s3://{BUCKET}/loss", f"checkpoint.every={every}",
                                            "cluster.max_failures=1", f"checkpoint.resume={self.warm_uri}"]
        spec, out = self.spec("loss", ov, timed_from=0), self.work / "loss.out.json"
        out.unlink(missing_ok=True)
        log = self.work / "loss.log"
        proc = self.nc.spawn("n0", [PY, "-m", "scripts.bench.netbench.arm", str(spec), str(out)], log)
        t_kill = None
        deadline = time.monotonic() + 1800
        while proc.poll() is None and time.monotonic() < deadline:
            done = [int(s) for s in re.findall(r"step\s+(\d+) \|", log.read_text(errors="replace"))]
            if t_kill is None and done and max(done) >= a.warm_steps + kill_at:
                t_kill = time.monotonic()
                killed = self.nc.kill_node("n1")
                self.say(f"node loss: killed {killed} processes of n1 after step {max(done)}")
                self.nc.restart_node("n1")
                self.say(f"node loss: n1's Ray restarted {time.monotonic() - t_kill:.1f} s after the kill")
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        res = json.loads(out.read_text()) if out.exists() else {"state": "no result", "steps": [], "restarts": 0}
        after = [s for s in res["steps"] if t_kill is not None and s["t"] > t_kill]
        recovery = after[0]["t"] - t_kill if after else None
        corrupted, committed = self.verify_checkpoints("loss")
        return {"node_loss_recovered": res["state"] == "finished" and t_kill is not None and res["restarts"] >= 1,
                "node_loss_recovery_s": recovery, "committed_checkpoints_corrupted": corrupted,
                "committed_checkpoints": committed, "node_loss_restarts": res["restarts"],
                "node_loss_state": res["state"], "node_loss_error": (res.get("error") or "")[:300]}

    def verify_checkpoints(self, run: str) -> tuple[int, int]:
        ls = self.nc.run("c0", ["moetrain", "ckpt", "list", f"s3://{BUCKET}/loss/{run}", "--s3-endpoint", self.s3],
                         timeout=300)
        steps = re.findall(r"^\S+\s+(\d+)\s+yes\s", ls.stdout, flags=re.M)
        bad = 0
        for step in steps:
            v = self.nc.run("c0", ["moetrain", "ckpt", "verify", f"s3://{BUCKET}/loss/{run}/step-{step}",
                                   "--s3-endpoint", self.s3], timeout=300)
            bad += v.returncode != 0
        return bad, len(steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 x 2 at 100 Mbit/s, few steps")
    ap.add_argument("--warm-steps", type=int, default=None, help="default 40 (quick: 6)")
    ap.add_argument("--skip-steps", type=int, default=None,
                    help="steps after the resume before the timed window (default 2, quick: 1)")
    ap.add_argument("--timed-steps", type=int, default=None, help="default 5 (quick: 2)")
    ap.add_argument("--rates", default=None, help="link rates in Mbit/s (default 100,1000; quick: 100)")
    ap.add_argument("--layouts", default=None, help="default 2x2,4x1 (quick: 2x2)")
    ap.add_argument("--ilp-time-s", type=float, default=None, help="default 20 (quick: 5)")
    ap.add_argument("--loss-steps", type=int, default=0, help="node-loss run length after the warm steps (0: 16)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of every arm, order reversed each round "
                    "(default 2, quick: 1); an arm's step time is its fastest round's")
    ap.add_argument("--no-node-loss", action="store_true")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed-MoE peer")
    ap.add_argument("--ds-capacity-factor", type=float, default=1.0, help="DeepSpeed MoE capacity factor (its default)")
    ap.add_argument("--work-dir", default="")
    ap.add_argument("--arms", default="flat:contiguous,flat:ilp,hierarchical:contiguous,hierarchical:ilp_node",
                    help="DISPATCH:PLACEMENT list")
    ap.add_argument("--attach", default="", help="run on this existing netcluster (2x2 + a client) instead of building")
    results.add_flag(ap)
    args = ap.parse_args(argv)
    defaults = dict(warm_steps=(40, 6), skip_steps=(2, 1), timed_steps=(5, 2), rates=("100,1000", "100"),
                    layouts=("2x2,4x1", "2x2"), ilp_time_s=(20.0, 5.0), rounds=(2, 1))
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    loss_steps = args.loss_steps or (8 if args.quick else 16)
    args.loss_every, args.loss_kill_step = 2 if args.quick else 4, 3 if args.quick else 6
    args.loss_steps = args.warm_steps + loss_steps
    args.work_dir = args.work_dir or f"/tmp/bench_multinode_{os.getpid()}"
    args.arm_list = [tuple(a.split(":")) for a in args.arms.split(",")]
    if args.attach and args.layouts != "2x2":
        ap.error("--attach runs one layout: add --layouts 2x2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = netcluster.unavailable_reason()
    if reason:
        print(f"bench_multinode: {reason}", file=sys.stderr)
        return 2
    from placement import load_routing
    from scripts.bench.netbench.plan import plan_layout

    b = Bench(args)
    rows, plans, extra = [], {}, {}
    dispatches = ["flat", "hierarchical"] if has_dispatch_modes() else ["flat"]
    try:
        layouts = args.layouts.split(",")
        for i, layout in enumerate(layouts):
            nodes, rpn = LAYOUTS[layout]
            b.cluster(nodes, rpn)
            if i == 0:  # one warm run; its checkpoint (a local folder: same machine) serves every layout
                stats = load_routing(b.warm())
            plan = plans[layout] = plan_layout(stats, nodes * rpn, rpn, args.ilp_time_s)
            b.say(f"plan {layout}: {json.dumps(plan.summary())}")
            paths = plan.write(b.work / "placements")
            for rate in [float(r) for r in args.rates.split(",")]:
                jobs = [(d, p) for d, p in args.arm_list
                        # one rank per node: hierarchical sends exactly what flat sends
                        if d in dispatches and not (d == "hierarchical" and rpn == 1)]
                jobs += [] if args.no_deepspeed else [("deepspeed", "contiguous")]
                rows += b.rounds(layout, rate, jobs, paths)
            if i == 0 and not args.no_node_loss:
                extra.update(b.node_loss())
    finally:
        if b.nc is not None and not args.attach:
            b.nc.down()
    result = report.summarize(rows, plans, extra, args, has_dispatch_modes(), TARGETS)
    if b.errors:
        result["arm_errors"] = b.errors
    print(report.table(rows, plans, result))
    print(json.dumps(result))
    results.record(SCHEMA, result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
