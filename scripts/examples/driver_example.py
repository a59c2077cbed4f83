"""A driver script on moetrain's Python API: build a config, run it on Ray, read the results.

    .venv/bin/python scripts/examples/driver_example.py                    # tiny model, 2 workers, 30 steps
    .venv/bin/python scripts/examples/driver_example.py --steps 10 --out-dir /tmp/runs
    RAY_ADDRESS=127.0.0.1:6379 .venv/bin/python scripts/examples/driver_example.py   # join a running cluster

Without ``RAY_ADDRESS`` (or ``--set cluster.address=...``) ``run()`` starts an embedded local Ray.
It prints the final training loss, validation loss per domain, throughput and expert-load
imbalance, then reads the run's ``summary.json`` and ``routing.npz`` back from its output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from cluster.api import load_config, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--run-name", default="driver-example")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    # 1. Build a config: the shipped `tiny` one, shortened, on 2 expert-parallel workers.
    cfg = load_config("tiny", [
        f"train.steps={args.steps}", f"train.warmup_steps={max(1, args.steps // 10)}", "train.eval_every=0",
        f"train.log_every={max(1, args.steps // 5)}", f"cluster.num_workers={args.workers}",
        f"cluster.run_name={args.run_name}", f"logging.out_dir={args.out_dir}", "logging.wandb=disabled",
        "data.max_bytes_per_domain=400000", *args.overrides,
    ])

    # 2. Run it. on_step is called on the driver after every optimizer step.
    losses: list[float] = []
    result = run(cfg, on_step=lambda m: losses.append(m.loss), raise_on_failure=False)
    if result.state.value != "finished":
        print(f"run failed ({result.state.value}):\n{result.error}", file=sys.stderr)
        return 1

    # 3. The results, from the returned RunResult.
    s = result.summary
    load = np.asarray(s["load_LE"], dtype=np.float64)
    imbalance = load.max(axis=1) / np.maximum(load.mean(axis=1), 1e-12)  # max/mean per MoE layer
    print("=== driver example results ===")
    print(f"state            {result.state.value} ({s['steps']} steps, {s['num_workers']} workers, "
          f"{result.restarts} restarts)")
    print(f"final loss       {result.history[-1].loss:.4f} (first {losses[0]:.4f})")
    for domain, v in s["val_loss"].items():
        print(f"val loss         {domain}: {s['val_start'][domain]:.4f} -> {v:.4f}")
    print(f"tokens/s         {s['tokens_per_s']:,.0f}")
    print("expert load      max/mean per layer: " + " ".join(f"L{l}={v:.2f}" for l, v in enumerate(imbalance)))

    # 4. The same run from its output folder.
    out = Path(s["outputs"])
    saved = json.loads((out / "summary.json").read_text())
    with np.load(out / "routing.npz") as routing:
        meta = json.loads(str(routing["meta"]))
        topk = routing["topk_ids"]
        print(f"outputs          {out}")
        print(f"summary.json     last_loss={saved['last_loss']:.4f} tokens={saved['tokens']}")
        print(f"routing.npz      topk_ids {tuple(topk.shape)} (tokens x layers x k), "
              f"{meta['num_experts']} experts, top-{meta['k']}; arrays: {', '.join(sorted(routing.files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
