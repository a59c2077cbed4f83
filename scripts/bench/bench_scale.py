"""Benchmark of issue #12 (bf16, ZeRO for the dense state, activation checkpointing, the memory
planner, the ~1B sibling): prints a table, then one JSON line with

    bf16_vs_fp32_tokens_per_s, model_flops_share_of_bf16_peak, zero_dense_optimizer_bytes_ratio,
    activation_checkpointing_memory_ratio, planner_max_rel_error, largest_total_params_trained,
    targets, all_targets_met

Everything is measured in this run (baselines included; ratios from interleaved repetitions in the
same processes). A key whose measurement did not come back (or --quick) is null and its target unmet. Studies live in ``scripts/bench/scale/`` (memory: planner validation; features:
bf16, ZeRO, largest sibling; procs: the spawned gloo ranks and the peak-RSS measurement).

    python scripts/bench/bench_scale.py            # everything (tens of minutes on 2 cores)
    python scripts/bench/bench_scale.py --quick    # smoke test: one small planner case, no feature runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench import results  # noqa: E402
from scripts.bench.scale import features, memory  # noqa: E402

TARGETS = {
    "bf16_vs_fp32_tokens_per_s": ">= 2.5",
    "model_flops_share_of_bf16_peak": ">= 0.35",
    "zero_dense_optimizer_bytes_ratio": "<= 1/N + 0.05",
    "planner_max_rel_error": "<= 0.15",
    "largest_total_params_trained": ">= 1e9",
}
# --quick: one 2-rank case of a small model (the smoke test checks the output's shape, not a target)
QUICK_COMMON = ["model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.moe.num_experts=8",
                "model.moe.top_k=2", "model.moe.expert_ffn_dim=128", "data.seq_len=64", "train.steps=2",
                "train.eval_every=0"]
QUICK_CASES = (("fp32 z0 none R2 mb8", ["cluster.num_workers=2", "train.global_batch_size=16"]),)
CKPT_PAIR = ("fp32 z0 none R2 mb16", "fp32 z0 block R2 mb16")
_TARGET_ROWS = (  # key, comparison, threshold (ZeRO: 1/N + 0.05 at N = 4), unit, description
    ("bf16_vs_fp32_tokens_per_s", ">=", 2.5, "x", "bf16 vs fp32 tokens/s, olmoe-1b-7b-mini, 2 actors"),
    ("model_flops_share_of_bf16_peak", ">=", 0.35, "%", "useful FLOP/s of the bf16 step / bf16 GEMM rate"),
    ("zero_dense_optimizer_bytes_ratio", "<=", 0.30, "", "dense optimizer bytes per rank, ZeRO-1 / 0, 4 actors"),
    ("planner_max_rel_error", "<=", 0.15, "%", "memory planner: worst predicted vs measured peak per rank"),
    ("largest_total_params_trained", ">=", 1e9, "", "largest preset sibling trained 3 steps on 4 actors"),
)
SCHEMA = results.Schema(
    "scale", "bf16, ZeRO, activation checkpointing, the memory planner, the ~1B sibling (issue 12)",
    targets=tuple(results.Target(k, op, thr, unit, what, met_key=f"targets.{k}.met")
                  for k, op, thr, unit, what in _TARGET_ROWS),
    keys=("activation_checkpointing_memory_ratio", "targets", "all_targets_met"))


def _met(key: str, value, world: int) -> bool:
    if value is None:
        return False
    return {"bf16_vs_fp32_tokens_per_s": value >= 2.5, "model_flops_share_of_bf16_peak": value >= 0.35,
            "zero_dense_optimizer_bytes_ratio": value <= 1 / world + 0.05, "planner_max_rel_error": value <= 0.15,
            "largest_total_params_trained": value >= 1e9}[key]


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.1f}"


def _planner_table(rows) -> list[str]:
    lines = ["planner validation: predicted vs measured peak bytes per rank above the runtime baseline (MiB)",
             f"  {'case':<30} {'predicted':>10} {'measured':>10} {'error':>7} {'glibc-default':>14} {'error':>7}"]
    for r in rows:
        d_err = "-" if r.default_rel_error is None else f"{r.default_rel_error:.1%}"
        lines.append(f"  {r.label:<30} {_mib(r.predicted_bytes):>10} {_mib(r.measured_bytes):>10} "
                     f"{r.rel_error:>7.1%} {_mib(r.measured_default_bytes):>14} {d_err:>7}")
    return lines


def _ckpt_ratio(rows) -> float | None:
    by = {r.label: r.measured_bytes for r in rows}
    none, block = (by.get(label) for label in CKPT_PAIR)
    return block / none if none and block else None


def run(args) -> dict:
    lines: list[str] = []
    cases = list(QUICK_CASES) if args.quick else list(memory.CASES)
    rows = memory.validate_planner(cases, common=QUICK_COMMON if args.quick else memory.COMMON,
                                   glibc_default=not args.quick)
    lines += _planner_table(rows)
    out = {key: None for key in TARGETS}
    out["planner_max_rel_error"] = max(r.rel_error for r in rows)
    out["activation_checkpointing_memory_ratio"] = _ckpt_ratio(rows)
    zero_world = 4
    if not args.quick:
        bf = features.measure_bf16(reps=args.reps)
        out["bf16_vs_fp32_tokens_per_s"], out["model_flops_share_of_bf16_peak"] = bf["ratio"], bf["mfu"]
        lines.append(f"bf16 vs fp32 (2 ranks, {features.THROUGHPUT_CONFIG}): {bf['bf16_tokens_per_s']:,.0f} vs "
                     f"{bf['fp32_tokens_per_s']:,.0f} tokens/s, ratio {bf['ratio']:.2f} (range "
                     f"{bf['ratio_range'][0]:.2f}-{bf['ratio_range'][1]:.2f}); model FLOP/s "
                     f"{bf['model_flops_per_s'] / 1e9:,.1f} G of bf16 GEMM {bf['bf16_gemm_flops_per_s'] / 1e9:,.1f} G")
    if not args.quick:
        z = features.measure_zero(world=zero_world)
        out["zero_dense_optimizer_bytes_ratio"] = z["ratio"]
        ratio = "not found" if z["ratio"] is None else f"{z['ratio']:.3f}"
        lines.append(f"ZeRO-1 vs 0 ({zero_world} ranks): dense optimizer state {_mib(z['stage1_bytes'])} vs "
                     f"{_mib(z['stage0_bytes'])} MiB per rank, ratio {ratio}")
    if not args.quick and not args.skip_largest:
        big = features.measure_largest()
        out["largest_total_params_trained"] = big["params"]
        for t in big["tried"]:
            lines.append(f"largest sibling: {t}")
    for key in ("bf16_vs_fp32_tokens_per_s", "model_flops_share_of_bf16_peak", "zero_dense_optimizer_bytes_ratio",
                "activation_checkpointing_memory_ratio"):
        if out[key] is None:
            lines.append(f"{key}: not measured ({'--quick' if args.quick else 'no measurement came back'})")
    met = {key: _met(key, out[key], zero_world) for key in TARGETS}
    out["targets"] = {key: {"target": TARGETS[key], "met": met[key]} for key in TARGETS}
    out["all_targets_met"] = all(met.values())
    print("\n".join(lines), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: one small planner case, no feature runs")
    p.add_argument("--skip-largest", action="store_true",
                   help="do not train the ~1B sibling (largest_total_params_trained stays null)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the bf16 / fp32 timing")
    results.add_flag(p)
    args = p.parse_args(argv)
    if args.reps < 1:
        print(f"bench_scale: --reps ({args.reps}) must be >= 1", file=sys.stderr)
        return 2
    line = run(args)
    print(json.dumps(line))
    results.record(SCHEMA, line, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
