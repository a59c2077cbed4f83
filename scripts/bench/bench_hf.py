"""Time and peak memory of ``moetrain hf import`` / ``export`` on a random ~1B-parameter
OLMoE-shaped model, each as a multiple of the raw safetensors read / write of the same bytes
measured in the same run.

    python scripts/bench/bench_hf.py [--out DIR] [--reps 3] [--layers 12] [--dim 1024]

Steps: write a random model (bf16, like published OLMoE checkpoints) as HF shards straight to
disk (never whole in memory); then ``--reps`` interleaved rounds of four measurements, each in
a fresh Python process that reports its own peak RSS (``VmHWM``; mmap-ed file pages it
touches count too):
  raw_read   safetensors.safe_open + get_tensor(...).clone() of every tensor (the package's own
             reader; get_tensor alone is a lazy view of the mmap and reads nothing)
  import     moetrain.hf.import_hf: HF dir -> checkpoint (dense.pt + one object per expert)
  raw_write  safetensors.torch.save_file of every shard's tensors (loaded before the clock) + fsync
  export     moetrain.hf.export_hf: checkpoint -> HF shards + index + config
Both moetrain directions fsync what they write (the checkpoint store's durability rule), so
the raw write fsyncs too. Prints medians and ranges; the baseline RSS is a process that only
imports torch and moetrain.hf.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import results  # noqa: E402
from scripts.helpers import REPO, last_json_line, proc_status_kib  # noqa: E402

SCHEMA = results.Schema(
    "hf", "moetrain hf import / export of a ~1B-parameter OLMoE-shaped model vs raw safetensors read / write",
    keys=("gb", "median_s", "range_s", "peak_rss_mb_median", "import_vs_raw_read", "export_vs_raw_write", "reps"))

SHARD_BYTES = 1 << 30
VOCAB = 50304  # OLMoE's vocabulary
CHILD = "--child"


def olmoe_config(layers: int, dim: int) -> dict:
    return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": VOCAB, "hidden_size": dim,
            "intermediate_size": dim * 3 // 8, "num_hidden_layers": layers, "num_attention_heads": dim // 64,
            "num_key_value_heads": dim // 64, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False, "dtype": "bfloat16",
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "hidden_act": "silu",
            "clip_qkv": None, "attention_bias": False}


def write_model(out: Path, layers: int, dim: int) -> int:
    """Random HF OLMoE directory, streamed tensor by tensor; returns the parameter count."""
    import torch

    from moetrain.hf import ARCHS, model_config_from_hf
    from moetrain.hf.export import _shards
    from moetrain.hf.safetensors_io import INDEX, open_dir, write_shard
    from moetrain.hf.tensors import tensor_plan

    cfg = olmoe_config(layers, dim)
    plan = tensor_plan(ARCHS["olmoe"], model_config_from_hf(cfg))
    entries = [(s, torch.bfloat16, shape) for m in plan for s, shape in zip(m.sources, m.shapes)]
    shapes = {n: shape for n, _, shape in entries}
    gen = torch.Generator().manual_seed(0)
    store = open_dir(str(out))
    shards = _shards(entries, SHARD_BYTES)
    weight_map = {}
    for i, shard in enumerate(shards):
        key = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(store, key, shard, lambda n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16))
        weight_map.update({n: key for n, _, _ in shard})
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def param_count(hf_dir: Path) -> int:
    from moetrain.hf.safetensors_io import HFDir

    src = HFDir(str(hf_dir))
    return sum(info.nbytes // 2 for info in src.tensors.values())  # bf16


def child(op: str, src: str, dst: str) -> None:
    """One measurement in this (fresh) process: prints {"seconds", "bytes"}."""
    import torch  # noqa: F401  (imported before the clock, as in every op)

    import moetrain.hf as hf

    t0 = time.perf_counter()
    nbytes = 0
    if op == "raw_read":
        from safetensors import safe_open
        for shard in sorted(Path(src).glob("model-*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k).clone()  # get_tensor is a lazy view of the mmap: copy = read
                    nbytes += t.numel() * t.element_size()
                    del t
    elif op == "raw_write":
        from safetensors import safe_open
        from safetensors.torch import save_file
        elapsed = 0.0
        os.makedirs(dst, exist_ok=True)
        for shard in sorted(Path(src).glob("model-*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
            nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            s0 = time.perf_counter()
            target = os.path.join(dst, shard.name)
            save_file(tensors, target, metadata={"format": "pt"})
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            elapsed += time.perf_counter() - s0
            del tensors
        t0 = time.perf_counter() - elapsed
    elif op == "import":
        nbytes = hf.import_hf(src, dst, run="bench").bytes
    elif op == "export":
        nbytes = hf.export_hf(src, dst).bytes
    elif op != "baseline":
        raise SystemExit(f"unknown op {op!r}")
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": nbytes, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (VmHWM; getrusage's ru_maxrss would carry the
    parent's peak over the fork)."""
    kib = proc_status_kib("VmHWM")
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if kib is None else kib) / 1024


def measure(op: str, src: str, dst: str) -> dict:
    if dst:
        shutil.rmtree(dst, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, CHILD, op, src, dst], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise SystemExit(f"{op} failed:\n{proc.stderr[-3000:]}")
    return last_json_line(proc.stdout)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        return child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_hf")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--reuse", action="store_true", help="keep OUT/hf from an earlier run of the same shape")
    results.add_flag(ap)
    args = ap.parse_args()
    root = Path(args.out)
    hf_dir = root / "hf"
    t0 = time.perf_counter()
    if args.reuse and (hf_dir / "config.json").is_file() and \
            json.loads((hf_dir / "config.json").read_text()) == olmoe_config(args.layers, args.dim):
        params = param_count(hf_dir)
    else:
        shutil.rmtree(root, ignore_errors=True)
        hf_dir.mkdir(parents=True)
        params = write_model(hf_dir, args.layers, args.dim)
    print(f"random OLMoE-shaped model: {params / 1e9:.3f} B parameters, bf16, "
          f"{sum(p.stat().st_size for p in hf_dir.glob('*.safetensors')) / 1e9:.2f} GB in "
          f"{len(list(hf_dir.glob('*.safetensors')))} shards (written in {time.perf_counter() - t0:.0f} s)")
    runs: dict[str, list[dict]] = {k: [] for k in ("baseline", "raw_read", "import", "raw_write", "export")}
    ckpt = str(root / "ckpt")
    for rep in range(args.reps):
        for op, src, dst in (("baseline", "", ""), ("raw_read", str(hf_dir), ""), ("import", str(hf_dir), ckpt),
                             ("export", f"{ckpt}/bench", str(root / "out")),
                             ("raw_write", str(hf_dir), str(root / "raw"))):
            r = measure(op, src, dst)
            runs[op].append(r)
            print(f"rep {rep} {op:<9} {r['seconds']:7.2f} s  {r['bytes'] / 1e9:.2f} GB  peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB", flush=True)
    line = report(runs)
    print(json.dumps(line))
    results.record(SCHEMA, line, args)


def report(runs: dict[str, list[dict]]) -> dict:
    med = {op: statistics.median(r["seconds"] for r in rs) for op, rs in runs.items() if rs}
    rng = {op: (min(r["seconds"] for r in rs), max(r["seconds"] for r in rs)) for op, rs in runs.items() if rs}
    gb = runs["import"][0]["bytes"] / 1e9
    print(f"\n{gb:.2f} GB of tensors; medians over {len(runs['import'])} interleaved reps (range)")
    for op in ("raw_read", "import", "raw_write", "export"):
        print(f"  {op:<9} {med[op]:7.2f} s ({rng[op][0]:.2f}-{rng[op][1]:.2f})  {gb / med[op]:.2f} GB/s")
    rss = {op: statistics.median(r["peak_rss_mb"] for r in rs) for op, rs in runs.items() if rs}
    print("  peak RSS (median MB): " + ", ".join(f"{op} {v:.0f}" for op, v in rss.items()))
    both = med["raw_read"] + med["raw_write"]
    print(f"  import = {med['import'] / med['raw_read']:.2f} x raw read, {med['import'] / both:.2f} x raw read + write; "
          f"export = {med['export'] / med['raw_write']:.2f} x raw write, {med['export'] / both:.2f} x raw read + write")
    return {"gb": gb, "median_s": med, "range_s": rng, "peak_rss_mb_median": rss,
            "import_vs_raw_read": med["import"] / med["raw_read"], "export_vs_raw_write": med["export"] / med["raw_write"],
            "reps": len(runs["import"])}


if __name__ == "__main__":
    main()
