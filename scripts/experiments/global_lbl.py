"""Micro-batch vs global-batch load-balancing loss ("Demons in the Detail", Qwen 2025), reproduced small.

Trains the same small MoE LM twice on the mixed-domain corpus — ``train.loss.lbl_scope=micro``
and ``global`` — with the same seed, data order, steps and batch, on several Ray actors with
gradient accumulation, so that each rank's micro-batch is tiny (default: 1 sequence, i.e. one
domain's text). Micro-LBL then has to balance the experts inside every single sequence; global
LBL only over the whole global batch (counts all-reduced over ranks and accumulated over the
step's micro-batches), which leaves experts free to specialise by domain.

After training, the driver gathers the weights (``export_tensors("param")`` from every rank),
loads them into a single-process ``Transformer``, checks that it reproduces the group's
validation loss, and measures on held-out rows, per domain and MoE layer: validation loss, the
routing distribution over experts, top-k share, Jensen-Shannon divergence between domains (bits)
and global load max/mean (``moetrain.analysis.specialisation``).

Prints a table, then one JSON line (last line). Writes ``results.json`` and ``global_lbl.png``
(heatmaps domains x experts per layer, micro vs global) under ``--out``.

    .venv/bin/python scripts/experiments/global_lbl.py                  # the documented run
    .venv/bin/python scripts/experiments/global_lbl.py --quick --out /tmp/glbl   # CI size, < 2 min
    .venv/bin/python scripts/experiments/global_lbl.py --domain law=~/law --domain bio=~/bio
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moetrain.analysis.specialisation import layer_report  # noqa: E402
from moetrain.config import RunConfig, load_config, validate  # noqa: E402
from scripts.helpers import log  # noqa: E402

# The reduced CI configuration: a narrower model, shorter rows, a small corpus, 2 workers.
QUICK = {"steps": 30, "workers": 2, "accum": 2, "global_batch": 4, "eval_rows": 32,
         "set": ["model.dim=64", "model.ffn_dim=128", "model.moe.expert_ffn_dim=64", "model.max_seq_len=64",
                 "data.seq_len=64", "data.vocab_size=512", "data.max_bytes_per_domain=120000"]}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="base config: tiny | small | a YAML path (default tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 400; quick 30)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default 4; quick 2)")
    p.add_argument("--accum", type=int, default=None, help="micro-batches per step (default 4; quick 2)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default 16 -> 1 sequence per rank per micro-batch)")
    p.add_argument("--lbl-coeff", type=float, default=0.05, help="load-balancing loss coefficient (default 0.05)")
    p.add_argument("--scopes", default="micro,global", help="LBL scopes to compare (micro,global[,sequence])")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                   help="a labelled text file/directory/.jsonl/.parquet (repeatable); default: the bundled corpus")
    p.add_argument("--eval-rows", type=int, default=None, help="held-out rows per domain to evaluate (default 256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--quick", action="store_true", help="reduced configuration for CI (< 2 minutes on 2 cores)")
    p.add_argument("--out", default="runs/global_lbl", help="output directory (default runs/global_lbl)")
    p.add_argument("--ray-temp-dir", default="", help="_temp_dir for the local Ray this script starts")
    p.add_argument("--replot", default="", metavar="RESULTS_JSON",
                   help="no training: redraw the figure and table of a finished run's results.json into --out")
    args = p.parse_args(argv)
    base = QUICK if args.quick else {"steps": 400, "workers": 4, "accum": 4, "global_batch": 16, "eval_rows": 256,
                                     "set": []}
    for key in ("steps", "workers", "accum", "global_batch", "eval_rows"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.set = base["set"] + args.set
    args.scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    return args


def build_config(args: argparse.Namespace, scope: str) -> RunConfig:
    """The run config of one arm; only ``train.loss.lbl_scope`` and the run name differ."""
    bs = args.global_batch // args.accum
    overrides = [
        f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
        f"train.grad_accum_steps={args.accum}", f"train.warmup_steps={max(1, args.steps // 10)}",
        f"train.loss.lbl_scope={scope}", f"train.loss.lbl_coeff={args.lbl_coeff}",
        "train.eval_every=0", f"train.eval_batches={max(1, math.ceil(args.eval_rows / bs))}",
        f"cluster.num_workers={args.workers}", f"cluster.run_name=global-lbl-{scope}",
        "logging.wandb=disabled", "logging.progress=false", "checkpoint.uri=",
        "placement.replan_every=0", *args.set,
    ]
    cfg = load_config(args.config, overrides)
    if args.domain:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="paths", paths=list(args.domain)))
    return validate(cfg)


# ---------------------------------------------------------------------------------------------
# What the batches look like (pure: replays the trainer's data cursor)
# ---------------------------------------------------------------------------------------------


def describe_batches(cfg: RunConfig, domain_N: np.ndarray, num_domains: int) -> dict:
    """Domain make-up of the run's batches, replaying the trainer's cursor (same seed, order).

    A micro-batch is one rank's ``b = B / (accum x workers)`` rows of one accumulation step.
    Returns the share of micro-batches whose rows are all one domain, and the mean / min / max
    share of each domain in a global batch.
    """
    from moetrain.data import shard_global_batch
    from moetrain.data.training import open_training_data

    t, W = cfg.train, cfg.cluster.num_workers
    cursor = open_training_data(cfg.data, t.global_batch_size).cursor  # the trainer's stream
    homogeneous, micro, shares = 0, 0, []
    for _ in range(t.steps):
        dom_B = cursor.next_batch()[0]
        for r in range(W):
            for mb in shard_global_batch(dom_B, t.grad_accum_steps, W, r):
                homogeneous += int((mb == mb[0]).all())
                micro += 1
        shares.append(np.bincount(dom_B, minlength=num_domains) / len(dom_B))
    S = np.array(shares)
    return {"rows_per_micro_batch": cfg.micro_batch_size, "micro_batches": micro,
            "single_domain_micro_frac": homogeneous / micro,
            "global_batch_share_mean": S.mean(0).tolist(), "global_batch_share_min": S.min(0).tolist(),
            "global_batch_share_max": S.max(0).tolist()}


# ---------------------------------------------------------------------------------------------
# Training one arm on a worker group
# ---------------------------------------------------------------------------------------------


def start_ray(args: argparse.Namespace, cfg: RunConfig) -> bool:
    """Join RAY_ADDRESS, or start a local Ray. Returns True if this script started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], namespace="moetrain", log_to_driver=False)
        return True
    need = int(math.ceil(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker)) + 1
    ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False, namespace="moetrain",
             log_to_driver=False, configure_logging=False, _temp_dir=args.ray_temp_dir or None)
    return True


def train_arm(cfg: RunConfig, log_every: int) -> dict:
    """Train one arm on a fresh worker group; return history, group validation and weights."""
    from cluster.group import WorkerGroup
    from moetrain.train.summary import load_imbalance
    from moetrain.train.trainer import initial_placement

    scope = cfg.train.loss.lbl_scope
    t0 = time.perf_counter()
    group = WorkerGroup.create(cfg, initial_placement(cfg))
    try:
        t_start = time.perf_counter() - t0
        history = []
        for _ in range(cfg.train.steps):
            m = group.call("train_step")[0]
            imb = load_imbalance(m.load_LE)
            history.append({"step": m.step, "lm_loss": m.lm_loss, "lbl": m.lbl,
                            "load_imbalance": imb.tolist(), "step_time_s": m.step_time_s})
            if m.step % log_every == 0 or m.step == 1:
                print(f"[{scope:>6}] step {m.step:>4}  lm {m.lm_loss:.4f}  lbl {m.lbl:.4f}  "
                      f"train load max/mean {imb.mean():.2f}  {m.step_time_s * 1e3:.0f} ms", flush=True)
        val = group.call("evaluate")[0]
        params: dict[str, np.ndarray] = {}
        for part in group.call("export_tensors", "param"):
            params.update(part)  # dense: identical on every rank; experts: disjoint primaries
    finally:
        group.shutdown()
    return {"history": history, "val_group": val, "params": params,
            "start_s": t_start, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# Driver-side evaluation: one process, the gathered weights
# ---------------------------------------------------------------------------------------------


def build_reference_model(cfg: RunConfig, vocab_size: int, params: dict[str, np.ndarray]):
    """A single-process Transformer (every expert local) holding the gathered weights."""
    import torch

    from moetrain.model import Transformer
    from moetrain.parallel.grads import EXPERT_PARAM_NAMES, expert_params

    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size) if cfg.model.vocab_size == 0 else cfg.model
    model = Transformer(model_cfg, seed=cfg.train.seed)
    used = set()
    with torch.no_grad():
        for name, p in model.dense_parameters():
            key = f"dense/{name}"
            p.copy_(torch.from_numpy(np.array(params[key])))
            used.add(key)
        for idx, layer in enumerate(model.moe_layers()):
            for wname, p in zip(EXPERT_PARAM_NAMES, expert_params(layer)):
                for slot, e in enumerate(layer.experts.local_experts):
                    key = f"experts/{idx}/{int(e)}/{wname}"
                    p[slot].copy_(torch.from_numpy(np.array(params[key])))
                    used.add(key)
    unused = sorted(set(params) - used)
    if unused:
        raise KeyError(f"gathered tensors not in the reference model: {unused[:5]}")
    return model.eval()


def evaluate_reference(cfg: RunConfig, model, ds, chunk_rows: int = 32) -> dict:
    """Per domain, on the rows the group's ``evaluate`` used: LM loss and per-layer routing.

    Same rows as ``RankTrainer.evaluate``: ``StreamingData.val_batches(domain, B / accum, eval_batches)``,
    each cut to a multiple of the world size (run here in chunks of ``chunk_rows``: the loss is a
    token mean and routing is per token, so the chunking changes neither). Returns val_loss per
    domain, per-layer topk ids [T, K] of all those tokens, and their domain labels [T].
    """
    import torch

    from moetrain.data.training import open_training_data

    bs = cfg.train.global_batch_size // cfg.train.grad_accum_steps
    W = cfg.cluster.num_workers
    stream = open_training_data(cfg.data, cfg.train.global_batch_size)
    val_loss, ids_LT, labels = {}, [[] for _ in model.moe_layers()], []
    with torch.no_grad():
        for d, name in enumerate(ds.domains):
            batches = stream.val_batches(name, bs, cfg.train.eval_batches, 1, 0)
            rows = [b[:(b.shape[0] // W) * W] for b in batches]
            rows_NT1 = np.concatenate(rows)
            nll, n = 0.0, 0
            for i in range(0, len(rows_NT1), chunk_rows):
                chunk = torch.from_numpy(np.array(rows_NT1[i:i + chunk_rows])).long()
                x, y = chunk[:, :-1], chunk[:, 1:]
                logits, routing = model(x)
                nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                         reduction="sum").item()
                n += y.numel()
                for acc, r in zip(ids_LT, routing):
                    acc.append(r.topk_ids_TK.numpy())
                labels.append(np.full(x.numel(), d, dtype=np.int64))
            val_loss[name] = nll / n if n else math.nan
    return {"val_loss": val_loss, "topk_ids": [np.concatenate(a) for a in ids_LT],
            "domain_T": np.concatenate(labels)}


def analyse_arm(cfg: RunConfig, ds, arm: dict) -> dict:
    """Reference-model evaluation + specialisation read-outs of one trained arm (JSON-able)."""
    model = build_reference_model(cfg, ds.vocab_size, arm["params"])
    ev = evaluate_reference(cfg, model, ds)
    moe = cfg.model.moe
    layers = [layer_report(ids, ev["domain_T"], ds.domains, moe.num_experts, moe.top_k) for ids in ev["topk_ids"]]
    repro = max(abs(ev["val_loss"][d] - arm["val_group"][d]) for d in ds.domains)
    tail = arm["history"][-max(1, len(arm["history"]) // 5):]
    return {
        "val_loss": ev["val_loss"], "val_loss_group": arm["val_group"],
        "val_ppl": {d: math.exp(v) for d, v in ev["val_loss"].items()},
        "val_loss_mean": float(np.mean(list(ev["val_loss"].values()))),
        "repro_max_abs_diff": repro,
        "layers": layers,
        "topk_share": [lay["topk_share"] for lay in layers],
        "jsd_bits": [lay["jsd_bits"] for lay in layers],
        "val_load_imbalance": [lay["load_imbalance"] for lay in layers],
        "train_lm_loss_last20pct": float(np.mean([h["lm_loss"] for h in tail])),
        "train_load_imbalance_last20pct": float(np.mean([np.mean(h["load_imbalance"]) for h in tail])),
        "wall_s": arm["wall_s"], "group_start_s": arm["start_s"],
        "history": arm["history"],
    }


# ---------------------------------------------------------------------------------------------
# Output: table, figure, JSON
# ---------------------------------------------------------------------------------------------


def format_table(results: dict, domains: list[str], top_k: int) -> str:
    scopes = list(results)
    w = 12
    head = f"{'':<34}" + "".join(f"{s:>{w}}" for s in scopes)
    lines = [head, "-" * len(head)]

    def row(label: str, values: list[float], fmt: str = ".4f") -> None:
        lines.append(f"{label:<34}" + "".join(f"{v:>{w}{fmt}}" for v in values))

    for d in domains:
        row(f"val loss  {d}", [results[s]["val_loss"][d] for s in scopes])
        row(f"val ppl   {d}", [results[s]["val_ppl"][d] for s in scopes], ".2f")
    row("val loss  mean over domains", [results[s]["val_loss_mean"] for s in scopes])
    row("train lm loss (last 20% steps)", [results[s]["train_lm_loss_last20pct"] for s in scopes])
    row("train load max/mean (last 20%)", [results[s]["train_load_imbalance_last20pct"] for s in scopes], ".3f")
    n_layers = len(results[scopes[0]]["layers"])
    for layer in range(n_layers):
        for d in domains:
            row(f"L{layer} top-{top_k} share  {d}", [results[s]["topk_share"][layer][d] for s in scopes], ".3f")
        row(f"L{layer} JSD between domains (bits)", [results[s]["jsd_bits"][layer] for s in scopes], ".4f")
        row(f"L{layer} val load max/mean", [results[s]["val_load_imbalance"][layer] for s in scopes], ".3f")
    row("|driver - group| val loss", [results[s]["repro_max_abs_diff"] for s in scopes], ".1e")
    row("wall time per run (s)", [results[s]["wall_s"] for s in scopes], ".0f")
    return "\n".join(lines)


def plot(results: dict, domains: list[str], top_k: int, path: Path, title: str) -> None:
    """Heatmaps P_DE (domains x experts) per MoE layer (rows) and scope (columns) + LM-loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = list(results)
    L = len(results[scopes[0]]["layers"])
    E = len(results[scopes[0]]["layers"][0]["P_DE"][0])
    vmax = max(np.max(lay["P_DE"]) for s in scopes for lay in results[s]["layers"])
    fig, axes = plt.subplots(L + 1, len(scopes), figsize=(4.4 * len(scopes) + 0.8, 1.2 + 2.1 * (L + 1)),
                             squeeze=False, gridspec_kw={"height_ratios": [1] * L + [1.3]}, layout="constrained")
    for c, s in enumerate(scopes):
        for layer in range(L):
            ax = axes[layer, c]
            rep = results[s]["layers"][layer]
            P = np.asarray(rep["P_DE"])
            im = ax.imshow(100 * P, cmap="viridis", vmin=0, vmax=100 * vmax, aspect="auto")
            for (i, j), v in np.ndenumerate(P):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * vmax else "white")
            ax.set_yticks(range(len(domains)), domains, fontsize=8)
            ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
            share = " ".join(f"{d[:4]} {rep['topk_share'][d]:.2f}" for d in domains)
            ax.set_title(f"{s} LBL, MoE layer {layer}\nJSD {rep['jsd_bits']:.3f} bit | top-{top_k}: {share}",
                         fontsize=8)
            if layer == L - 1:
                ax.set_xlabel("expert", fontsize=8)
        cb = fig.colorbar(im, ax=axes[:L, c].tolist(), shrink=0.9)
        cb.set_label("% of the domain's selections", fontsize=7)
        cb.ax.tick_params(labelsize=7)
    gs = axes[L, 0].get_gridspec()
    for ax in axes[L, :]:
        ax.remove()
    ax = fig.add_subplot(gs[L, :])
    for s in scopes:
        lm = np.array([h["lm_loss"] for h in results[s]["history"]])
        k = max(1, len(lm) // 25)
        smooth = np.convolve(lm, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k, smooth, label=f"{s} LBL (val mean {results[s]['val_loss_mean']:.3f})")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("train LM loss (smoothed)", fontsize=8)
    ax.legend(fontsize=8)
    ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary_line(args: argparse.Namespace, cfg: RunConfig, batches: dict, results: dict, domains: list[str],
                 out: Path) -> dict:
    scopes = list(results)
    line = {
        "experiment": "global_lbl", "config": args.config, "steps": args.steps, "workers": args.workers,
        "accum": args.accum, "global_batch": args.global_batch, "micro_batch_rows": cfg.micro_batch_size,
        "seq_len": cfg.data.seq_len, "num_experts": cfg.model.moe.num_experts, "top_k": cfg.model.moe.top_k,
        "lbl_coeff": args.lbl_coeff, "domains": domains,
        "single_domain_micro_frac": batches["single_domain_micro_frac"],
        "scopes": {s: {k: results[s][k] for k in ("val_loss", "val_loss_mean", "topk_share", "jsd_bits",
                                                   "val_load_imbalance", "train_load_imbalance_last20pct",
                                                   "repro_max_abs_diff", "wall_s")} for s in scopes},
        "figure": str(out / "global_lbl.png"), "results": str(out / "results.json"),
    }
    if "micro" in results and "global" in results:
        g, m = results["global"], results["micro"]
        line["global_minus_micro"] = {
            "val_loss_mean": g["val_loss_mean"] - m["val_loss_mean"],
            "jsd_bits_mean": float(np.mean(g["jsd_bits"]) - np.mean(m["jsd_bits"])),
        }
    return line


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def figure_title(args: argparse.Namespace, cfg: RunConfig) -> str:
    return (f"global vs micro LBL: {args.steps} steps, {args.workers} workers x {args.accum} micro-batches x "
            f"{cfg.micro_batch_size} seq of {cfg.data.seq_len} tokens, lbl_coeff {args.lbl_coeff}, "
            f"E={cfg.model.moe.num_experts} top-{cfg.model.moe.top_k}, seed {cfg.train.seed}; held-out tokens")


def replot(args: argparse.Namespace, out: Path) -> None:
    """Redraw figure + table of a finished run from its results.json (no training)."""
    saved = json.loads(Path(args.replot).read_text())
    results = saved["results"]
    cfg_dict = next(iter(saved["config"].values()))
    from moetrain.config import from_dict

    cfg = from_dict(cfg_dict)
    domains = list(next(iter(results.values()))["val_loss"])
    plot(results, domains, cfg.model.moe.top_k, out / "global_lbl.png",
         figure_title(argparse.Namespace(**saved["args"]), cfg))
    print(format_table(results, domains, cfg.model.moe.top_k))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        replot(args, out)
        return None
    cfgs = {s: build_config(args, s) for s in args.scopes}
    cfg0 = cfgs[args.scopes[0]]
    from moetrain.data import build_dataset

    ds = build_dataset(cfg0.data)  # on the driver first: bad data fails before any actor starts
    log(ds.summary())
    batches = describe_batches(cfg0, np.asarray(ds.train.domain_N), len(ds.domains))
    log(f"batches: {args.global_batch} rows/step = {args.workers} workers x {args.accum} micro-batches x "
          f"{cfg0.micro_batch_size} row(s); single-domain micro-batches {100 * batches['single_domain_micro_frac']:.1f}%"
          f"; domain share per global batch mean {np.round(batches['global_batch_share_mean'], 3).tolist()}"
          f" (min {np.round(batches['global_batch_share_min'], 3).tolist()},"
          f" max {np.round(batches['global_batch_share_max'], 3).tolist()})")
    import ray

    started = start_ray(args, cfg0)
    log("ray ready")
    try:
        results = {}
        for s in args.scopes:
            arm = train_arm(cfgs[s], log_every=max(1, args.steps // 10))
            log(f"{s}: trained in {arm['wall_s']:.0f}s (group start {arm['start_s']:.0f}s)")
            results[s] = analyse_arm(cfgs[s], ds, arm)
            log(f"{s}: analysed")
    finally:
        if started:
            ray.shutdown()
    table = format_table(results, list(ds.domains), cfg0.model.moe.top_k)
    plot(results, list(ds.domains), cfg0.model.moe.top_k, out / "global_lbl.png", figure_title(args, cfg0))
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "config": {s: c.to_dict() for s, c in cfgs.items()}, "batches": batches,
         "dataset": {"fingerprint": ds.fingerprint, "stats": ds.stats}, "results": results}, indent=1))
    line = summary_line(args, cfg0, batches, results, list(ds.domains), out)
    print(table)
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
