"""Command line of the EP benchmark: the flags, and ``main``, which runs every study per world
size, assembles the JSON (one line, last on stdout) and prints the tables."""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from scripts.bench import results
from scripts.helpers import REPO

from . import __doc__ as PACKAGE_DOC
from .common import PRECISIONS, summ
from .dedup import summarize_dedup
from .experts import expert_efficiency
from .layer import summarize_layer, summarize_overlap
from .memory import add_ratios_vs_world_1, mem_worker, summarize_memory
from .model import summarize_model
from .overlap_micro import overlap_worker, summarize_overlap_micro
from .report import (ISSUE14_TARGETS, balanced_parity, headline, issue14_figures, precision_key, print_precision_pass,
                     print_table)
from .skew import skew_summary
from .worker import run_group

QUICK = dict(world_sizes="2", iters=5, warmup=2, model_iters=3, eff_iters=8, mem_world_sizes="1,2",
             cfs="1.0,2.0", model_cfs="1.0")  # --quick defaults; values given on the command line win
_ISSUE14_WHAT = {
    "balanced_layer_speedup_vs_ds_cap": "MoE layer, balanced routing, capacity factor 1 both sides, vs DeepSpeed",
    "balanced_layer_dropless_vs_ds_nodrop": "MoE layer, balanced, dropless vs DeepSpeed without dropping",
    "balanced_model_speedup_vs_ds": "whole model, balanced routing, vs DeepSpeed",
    "skewed_layer_speedup_vs_ds": "MoE layer, routing skew 1.5, vs DeepSpeed",
    "skewed_model_speedup_vs_ds": "whole model, routing skew 1.5, vs DeepSpeed",
    "model_flops_share_of_gemm_peak": "whole-model useful FLOP rate / matmul rate, same threads",
    "overlap_hidden_comm_share": "all-to-all time hidden by the 2-chunk pipeline",
}
SCHEMA = results.Schema(
    "ep", "expert parallelism vs deepspeed.moe: MoE layer, whole model, dedup, expert efficiency, memory, overlap",
    targets=(results.Target("speedup_vs_deepspeed", ">=", 1.3, "x",
                            "whole model, realistic skew, moetrain dropless vs DeepSpeed without dropping",
                            met_key="target_met"),)
    + tuple(results.Target(f"{sec}issue14.{k}.value", ">=", thr, "%" if "share" in k else "x",
                           f"{_ISSUE14_WHAT[k]}{what}", met_key=f"{sec}issue14.{k}.met", optional=bool(sec))
            for sec, what in (("", ""), ("precision.bf16.", " (bf16)")) for k, thr in ISSUE14_TARGETS.items()),
    keys=("config", "layer", "model", "dedup", "expert_efficiency", "memory", "gpu", "cuda_available", "elapsed_s",
          "headline", "balanced_parity_paired", "skew", "overlap", "issue14"))


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="~1 minute: world 2 only, fewer iterations")
    results.add_flag(p)
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert hidden dim F")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--gate-std", type=float, default=0.02,
                   help="std of the random gate (x ~ N(0,1)); top-k is scale-invariant, so this sharpens the weights "
                        "but does not change which experts are chosen (loads stay mildly uneven, ~3%% dropped at cf=1)")
    p.add_argument("--skews", default="0,1.5",
                   help="target global expert load max/mean of the layer study (0 = balanced: no skew component)")
    p.add_argument("--cfs", default="1.0,1.25,2.0", help="capacity factors of the layer study (with dropping)")
    p.add_argument("--model-skews", default="0,1.5")
    p.add_argument("--model-cfs", default="1.0,2.0", help="(1.25 too with --model-cfs 1.0,1.25,2.0: +~90 s)")
    p.add_argument("--skew-c", type=float, default=0.25,
                   help="layer study: size of the shared input direction u, as a fraction of the mean input-row norm")
    p.add_argument("--headline-skew", type=float, default=1.5)
    p.add_argument("--corr", type=float, default=0.9, help="share of tokens routed to a co-located pair")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--eff-iters", type=int, default=10)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    # whole model
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--model-iters", type=int, default=3)
    # memory
    p.add_argument("--mem-ffn", type=int, default=1024)
    p.add_argument("--mem-tokens", type=int, default=512)
    p.add_argument("--mem-world-sizes", default="1,2,4")
    p.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler top-ops table of one step of each layer and model variant")
    p.add_argument("--chunks", type=int, default=2,
                   help="pipelined chunks of the overlapped moetrain variant (balanced, dropless; 1 = no such variant)")
    p.add_argument("--adamw", choices=("loop", "foreach", "fused"), default="fused",
                   help="torch.optim.AdamW implementation of every variant (moetrain's trainer uses fused)")
    p.add_argument("--threads-main", type=int, default=1)
    p.add_argument("--overlap-worlds", default="2,4",
                   help="worlds of the overlap microbenchmark (all-to-all alone, GEMM alone, both at once; '' skips)")
    p.add_argument("--overlap-iters", type=int, default=10)
    p.add_argument("--precision", default="fp32",
                   help="training precision of every variant: fp32, bf16 (moetrain's mixed precision: autocast, fp32 "
                        "master weights; DeepSpeed under the same autocast, see ds_baseline.DSMixedPrecision) or "
                        "fp32,bf16 (both, one pass each; bf16 issue-14 keys get the suffix _bf16)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_ep", description=PACKAGE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_study_flags(p)
    _add_model_flags(p)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    fl = lambda v: sorted({float(x) for x in v.split(",") if x})  # noqa: E731
    args.skew_list = fl(args.skews + ",0")
    args.cf_list = fl(args.cfs + f",{args.capacity_factor}")
    args.model_skew_list = fl(args.model_skews + ",0")
    args.model_cf_list = fl(args.model_cfs + f",{args.capacity_factor}")
    args.world_list = [int(w) for w in args.world_sizes.split(",") if w]
    args.precision_list = _precisions(p, args.precision)
    args.overlap_world_list = [int(w) for w in args.overlap_worlds.split(",") if w]
    args.mem_world_list = [int(w) for w in args.mem_world_sizes.split(",") if w]
    return args


def _precisions(p: argparse.ArgumentParser, value: str) -> list[str]:
    """The passes of ``--precision`` (a comma list of fp32 / bf16); a one-line error otherwise, or
    when bf16 is asked for where this CPU has no native bf16 matmul."""
    from moetrain.precision import bf16_native
    names = [x.strip() for x in value.split(",") if x.strip()]
    if not names or len(set(names)) != len(names) or any(n not in PRECISIONS for n in names):
        p.error(f"--precision ({value!r}) must be fp32, bf16 or fp32,bf16")
    native, why = bf16_native("cpu")
    if "bf16" in names and not native:
        p.error(f"--precision bf16 needs native bf16 matmul on this CPU: {why}")
    return names


def _new_output(args, cuda: bool) -> dict:
    return {"config": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
            "cuda_available": cuda, "cpu_count": os.cpu_count(), "layer": {}, "model": {},
            "dedup": {}, "expert_efficiency": [], "memory": {}, "gpu": None,
            "skew": {"layer": {}, "model": {}}, "overlap": {}}


def _add_world(out: dict, res: dict, args, ws: int) -> None:
    """Studies 1, 2, 4 and 6 of world ``ws`` from every rank's results."""
    r0, T = res[0], args.tokens
    out["layer"][str(ws)] = summarize_layer(r0, ws, ws * T)
    overlap = summarize_overlap(res, ws)
    if overlap is not None:
        out["overlap"][str(ws)] = overlap
    if "model_times" in r0:
        out["model"][str(ws)], model_skew = summarize_model(r0, args, ws)
    out["skew"]["layer"][str(ws)] = skew_summary(r0["layer_grid"], args, ws, ws * T, model=False)
    if "model_times" in r0:
        out["skew"]["model"][str(ws)] = model_skew
    if "dedup" in r0:
        out["dedup"][str(ws)] = summarize_dedup(res, ws, args.dim, args.top_k)
    out.setdefault("rss", {})[str(ws)] = {"peak_rss_mb_per_rank": [res[r]["peak_rss_mb"] for r in range(ws)]}


def _gpu_column(out: dict, args) -> None:
    """The layer study again, one GPU per rank (NCCL), for every world the GPUs can hold."""
    out["gpu"] = {}
    for ws in args.world_list:
        if torch.cuda.device_count() < ws or args.experts % ws:
            continue
        gargs = copy.copy(args)
        gargs.model_iters, gargs.profile = 0, False
        gargs.precision, gargs.dedup_study = args.precision_list[0], False
        res = run_group(ws, gargs, device_kind="cuda")
        out["gpu"][str(ws)] = {n: summ(v, ws * args.tokens) for n, v in res[0]["layer_times"].items()}


def _memory(out: dict, args) -> None:
    for ws in args.mem_world_list:
        if args.experts % ws:
            continue
        out["memory"][str(ws)] = summarize_memory(run_group(ws, args, target=mem_worker), ws)
    add_ratios_vs_world_1(out["memory"])


def _run_pass(out: dict, args, precision: str, first: bool, t_start: float) -> None:
    """Studies 1, 2, 4 (first pass only) and 6 of every world in one precision, into ``out``."""
    pargs = copy.copy(args)
    pargs.precision, pargs.dedup_study = precision, first
    for ws in args.world_list:
        if args.experts % ws:
            print(f"skip world {ws}: {args.experts} experts do not divide")
            continue
        _add_world(out, run_group(ws, pargs), pargs, ws)
        print(f"  world {ws} ({precision}) done at {time.perf_counter() - t_start:.0f} s")
    out["overlap_micro"] = {str(ws): summarize_overlap_micro(run_group(ws, pargs, target=overlap_worker), ws)
                            for ws in args.overlap_world_list}


def _finish(out: dict, args, t_start: float, passes: dict) -> None:
    """Headline and issue-14 figures. The top-level sections and the unsuffixed keys are the
    first pass's; ``precision[p]["issue14"]`` holds every pass's figures, a later pass's sections
    sit in ``precision[p]``, and its issue-14 values also at the top level as ``<key>_<p>``
    (fp32 unsuffixed: ``precision_key``)."""
    out["elapsed_s"] = time.perf_counter() - t_start
    hl = headline(out, args)
    out["headline"] = hl
    out["speedup_vs_deepspeed"] = hl["speedup_vs_deepspeed"]
    out["target_met"] = hl["target_met"]
    out["balanced_parity_paired"] = balanced_parity(out)
    out["precision"] = {}
    for prec, sec in passes.items():
        sec["issue14"] = issue14_figures(sec, args)
        out["precision"][prec] = sec if sec is not out else {"issue14": out["issue14"]}
        out.update({precision_key(k, prec): v["value"] for k, v in sec["issue14"].items()})


def main(argv=None) -> dict:
    args = parse_args(argv)
    ds_version = None
    if args.deepspeed:
        from .ds_baseline import require_deepspeed
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        ds_version = require_deepspeed()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads_main)
    cuda = torch.cuda.is_available()
    print(f"bench_ep: D={args.dim} F={args.ffn} E={args.experts} k={args.top_k} T={args.tokens}/rank "
          f"cf={args.capacity_factor} worlds={args.world_list} torch={torch.__version__} 1 thread/rank, gloo on 127.0.0.1")
    if not cuda:
        print("CUDA is not available: CPU/gloo only, no GPU/NCCL column.")
    out = _new_output(args, cuda)
    if ds_version is not None:
        out["deepspeed_version"] = ds_version
    # 3. expert compute efficiency (main process, before the groups load the CPU)
    for ws in args.world_list:
        out["expert_efficiency"].append(expert_efficiency(args, ws, 1))
    passes = {}
    for i, prec in enumerate(args.precision_list):
        passes[prec] = out if i == 0 else {"layer": {}, "model": {}, "skew": {"layer": {}, "model": {}},
                                           "overlap": {}, "overlap_micro": {}}
        _run_pass(passes[prec], args, prec, i == 0, t_start)
    if cuda:
        _gpu_column(out, args)
    _memory(out, args)  # 5. memory
    _finish(out, args, t_start, passes)
    print_table(out, args)
    for prec in args.precision_list[1:]:
        print_precision_pass(passes[prec], prec)
    print(json.dumps(out, default=float, separators=(",", ":")))
    results.record(SCHEMA, out, args)
    return out

