"""The run summary and the per-step log line: pure formatting of metrics.

Owns: turning metric dicts into what a person reads at the end of a run (tokens/s, validation
loss per domain, expert load per layer) and the periodic one-line progress message.
"""

from __future__ import annotations

import numpy as np

from moetrain.train.metrics import StepMetrics


def load_imbalance(load_LE: np.ndarray) -> np.ndarray:
    """max/mean tokens per expert of each layer, [L] (1.0 = perfectly balanced)."""
    load = np.asarray(load_LE, dtype=np.float64)
    mean = load.mean(axis=1)
    return np.where(mean > 0, load.max(axis=1) / np.maximum(mean, 1e-12), 1.0)


def step_line(m: StepMetrics) -> str:
    imb = load_imbalance(m.load_LE)
    return (
        f"step {m.step:>5} | loss {m.loss:.4f} (lm {m.lm_loss:.4f} lbl {m.lbl:.4f} "
        f"z {m.z_loss:.5f}) | lr {m.lr:.2e} | gnorm {m.grad_norm:.3f} | "
        f"load max/mean {imb.mean():.2f} | {m.tokens_per_s:,.0f} tok/s"
    )


def format_summary(summary: dict) -> str:
    lines = ["", "=== moetrain run summary ==="]
    lines.append(
        f"run            {summary['run_name']}  ({summary['num_workers']} worker(s), "
        f"{summary['steps']} steps, {summary['tokens']:,} tokens)"
    )
    lines.append(f"throughput     {summary['tokens_per_s']:,.0f} tokens/s (wall {summary['wall_s']:.1f} s)")
    lines.append(f"train loss     first {summary['first_loss']:.4f} -> last {summary['last_loss']:.4f}")
    lines.append(
        "validation     "
        + "  ".join(
            f"{d}: {summary['val_start'].get(d, float('nan')):.4f} -> {v:.4f}" for d, v in summary["val_loss"].items()
        )
    )
    load = np.asarray(summary["load_LE"])
    for layer, row in enumerate(load):
        share = row / max(row.sum(), 1)
        lines.append(
            f"expert load L{layer:<2}  max/mean {load_imbalance(load)[layer]:.2f}  "
            + " ".join(f"{s:.2f}" for s in share)
        )
    if summary.get("state", "finished") != "finished":
        lines.append(
            f"state          {summary['state'].upper()} at step {summary['steps']}"
            + (f": {summary['error']}" if summary.get("error") else "")
        )
    if summary.get("checkpoints_committed") or summary.get("checkpoints_failed"):
        lines.append(
            f"checkpoints    {summary['checkpoints_committed']} committed, {summary['checkpoints_failed']} failed"
        )
    plan = summary.get("memory_plan")
    if plan:
        lines.append(
            f"memory plan    {plan['total_bytes'] / 2**30:.2f} GiB per rank predicted (peak in "
            f"{plan['peak_phase']}; {plan['params_total'] / 1e9:.3f}e9 parameters)"
        )
    traffic = summary.get("traffic")
    if traffic and traffic.get("steps"):
        kinds = "  ".join(
            f"{k} {v['intra'] / 1e6:.2f}/{v['inter'] / 1e6:.2f}"
            for k, v in traffic["bytes_by_kind"].items()
            if v["intra"] or v["inter"]
        )
        lines.append(
            f"bytes sent     {traffic['inter_node_bytes_per_step'] / 1e6:.2f} MB/step between nodes, "
            f"{traffic['intra_node_bytes_per_step'] / 1e6:.2f} MB/step inside nodes (MB intra/inter: {kinds})"
        )
    if summary.get("skipped_steps"):
        lines.append(f"skipped steps  {summary['skipped_steps']} (non-finite loss or gradient norm)")
    if summary.get("outputs"):
        lines.append(f"outputs        {summary['outputs']}")
    return "\n".join(lines)
