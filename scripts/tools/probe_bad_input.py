"""Probe `moetrain train` with bad input, as a user would meet it, and count what is handled cleanly.

    .venv/bin/python scripts/tools/probe_bad_input.py [--jobs 2]

Each probe runs the real CLI in a subprocess and passes when it exits with status 2, prints no
traceback, and its error names what is wrong (the expected fragment). Prints a table, then one JSON
line with the counts. Nothing here starts Ray: every probe must be refused before training.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.helpers import REPO  # noqa: E402


def _probes(tmp: Path) -> list[tuple[str, list[str], str]]:
    latin1 = tmp / "latin1.yaml"
    latin1.write_bytes("train: {steps: 3}  # caf\xe9\n".encode("latin-1"))
    broken = tmp / "broken.yaml"
    broken.write_text("model: {dim: 64\n")
    listy = tmp / "list.yaml"
    listy.write_text("- 1\n")
    afile = tmp / "a-file"
    afile.write_text("x")
    s = lambda *kv: [a for x in kv for a in ("--set", x)]  # noqa: E731
    return [
        ("non-UTF-8 YAML", ["--config", str(latin1)], "is not UTF-8 text"),
        ("YAML syntax error", ["--config", str(broken)], "is not valid YAML"),
        ("YAML list at the top", ["--config", str(listy)], "mapping at the top level"),
        ("missing config file", ["--config", str(tmp / "nope.yaml")], "config file not found"),
        ("unknown key", s("model.moe.experts=4"), "unknown config key 'model.moe.experts'"),
        ("renamed key", s("placement.solver=ilp"), "was renamed 'placement.method'"),
        ("--set without =", ["--set", "train.steps"], "key=value"),
        ("non-integer steps", s("train.steps=abc"), "train.steps must be an integer"),
        ("log_every=0", s("train.log_every=0"), "train.log_every (0)"),
        ("eval_batches=0", s("train.eval_batches=0"), "train.eval_batches (0)"),
        ("beta1=2", s("train.beta1=2"), "train.beta1 (2.0)"),
        ("beta2=-0.1", s("train.beta2=-0.1"), "train.beta2 (-0.1)"),
        ("negative weight_decay", s("train.weight_decay=-1"), "train.weight_decay (-1.0)"),
        ("negative norm_eps", s("model.norm_eps=-1e-5"), "model.norm_eps"),
        ("NaN init_std", s("model.init_std=nan"), "model.init_std (nan)"),
        ("inf lr", s("train.lr=inf"), "train.lr (inf)"),
        ("min_lr > lr", s("train.min_lr=1.0"), "train.min_lr (1.0)"),
        ("negative torch_threads", s("cluster.torch_threads=-2"), "cluster.torch_threads (-2)"),
        ("zero cpus_per_worker", s("cluster.cpus_per_worker=0"), "cluster.cpus_per_worker (0.0)"),
        ("zero step timeout", s("cluster.step_timeout_s=0"), "cluster.step_timeout_s (0.0)"),
        ("first_moe_layer out of range", s("model.moe.first_moe_layer=9"), "model.moe.first_moe_layer (9)"),
        ("top_k > experts", s("model.moe.top_k=99"), "model.moe.top_k (99)"),
        ("groups do not divide", s("model.moe.num_groups=3"), "model.moe.num_groups (3)"),
        ("heads do not divide dim", s("model.dim=130"), "model.dim (130)"),
        ("seq_len > max_seq_len", s("data.seq_len=512"), "data.seq_len (512)"),
        ("small vocab", s("data.vocab_size=100"), "data.vocab_size (100)"),
        ("val_fraction 0.9", s("data.val_fraction=0.9"), "data.val_fraction (0.9)"),
        ("batch not divisible", s("train.global_batch_size=10", "cluster.num_workers=4"), "train.global_batch_size (10)"),
        ("run_name '..'", s("cluster.run_name=.."), "cluster.run_name ('..')"),
        ("run_name with a space", s("cluster.run_name=my run"), "cluster.run_name ('my run')"),
        ("run_name with '/'", s("cluster.run_name=a/b"), "cluster.run_name ('a/b')"),
        ("cluster.address=bogus", s("cluster.address=bogus"), "cluster.address ('bogus')"),
        ("unreachable address", s("cluster.address=127.0.0.1:1", "cluster.connect_timeout_s=3"), "cannot reach the Ray cluster"),
        ("bad dashboard port", s("cluster.dashboard_port=70000"), "cluster.dashboard_port (70000)"),
        ("unknown placement method", s("placement.method=annealing"), "placement.method ('annealing')"),
        ("window 0", s("placement.window=0"), "placement.window (0)"),
        ("keep 0", s("checkpoint.keep=0"), "checkpoint.keep (0)"),
        ("resume latest without uri", s("checkpoint.resume=latest"), "checkpoint.resume is 'latest'"),
        ("missing data path", s("data.source=paths", "data.paths=code=/nonexistent/dir"), "/nonexistent/dir"),
        ("paths without entries", s("data.source=paths"), "data.paths is empty"),
        ("out_dir under a file", s(f"logging.out_dir={afile}/runs"), "logging.out_dir"),
        ("unwritable checkpoint store", s("checkpoint.uri=s3://nowhere/x", "storage.s3_endpoint=http://127.0.0.1:1",
                                          "checkpoint.max_retries=0"), "s3://nowhere/x"),
        ("wandb mode typo", s("logging.wandb=cloud"), "logging.wandb ('cloud')"),
    ]


def _run(probe, env) -> dict:
    name, args, needle = probe
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    err = proc.stderr
    ok = proc.returncode == 2 and "Traceback" not in err and needle in err
    last = [line for line in err.strip().splitlines() if line.startswith("moetrain: error:")]
    return {"probe": name, "ok": ok, "exit": proc.returncode, "message": (last[-1] if last else err[-200:])[:160]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        probes = _probes(Path(tmp))
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda p: _run(p, env), probes))
    print(f"{'probe':<32} {'ok':<4} {'exit':<5} message")
    for r in rows:
        print(f"{r['probe']:<32} {'yes' if r['ok'] else 'NO':<4} {r['exit']:<5} {r['message']}")
    passed = sum(r["ok"] for r in rows)
    print(json.dumps({"probe": "bad_input", "probes": len(rows), "handled_cleanly": passed,
                      "failed": [r["probe"] for r in rows if not r["ok"]]}))
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
