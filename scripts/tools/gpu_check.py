"""One-GPU check of the CUDA path (issue #12 item 6); prints one JSON line.

1. ``train``: single-rank bf16 training of the shipped ~1B-total-parameter preset sibling
   ``olmoe-1b-7b-1b``:
   tokens/s and MFU (useful FLOPs/s, ``scripts.bench.bench_precision.train_flops_per_token``, over
   the GPU's measured bf16 GEMM rate and over its nominal dense bf16 peak when known).
2. ``grouped_gemm``: the routed experts' fwd+bwd as grouped GEMMs (``torch._grouped_mm``) vs
   the slot loop, same weights and rows, bf16; and their max relative difference.
3. ``cpu_vs_gpu``: the tiny model trained 5 steps in fp32 (TF32 off) on CPU and on the GPU:
   worst per-step loss difference and worst parameter relative error.

Without CUDA it prints ``{"cuda": false, ...}`` and exits 0: the CPU path never needs a GPU.
Run it through ``scripts/gpu_check.sh`` (budget: under 8 minutes on one GPU).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

PRESET_1B = "olmoe-1b-7b-1b"  # 1.016e9 parameters, OLMoE layout (moetrain/configs/)
COMMON = ["cluster.num_workers=1", "logging.wandb=disabled", "data.seq_len=1024", "data.vocab_size=2048",
          "data.max_bytes_per_domain=2000000", "train.global_batch_size=16", "train.eval_every=0",
          "train.zero_stage=0"]  # one GPU: no ZeRO
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
TRAIN_WARMUP, TRAIN_STEPS = 2, 8
TINY_STEPS = 5


def _sync() -> None:
    torch.cuda.synchronize()


def measured_bf16_tflops(size: int = 8192, reps: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    return 2.0 * size ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _trainer(path: str | None, overrides: list[str], device: str):
    from moetrain.config import load_config
    from moetrain.parallel.context import ParallelContext
    from moetrain.train.trainer import RankTrainer

    return RankTrainer(load_config(path, overrides), ctx=ParallelContext(device=torch.device(device)))


def one_billion_config(extra: list[str]):
    """(name, config path, overrides) of the shipped ~1B sibling on one rank, its sequence length
    capped at the model's."""
    from moetrain.config import builtin_config_path, load_config

    path = builtin_config_path(PRESET_1B)
    seq = min(1024, load_config(str(path), []).model.max_seq_len)
    return PRESET_1B, str(path), COMMON + [f"data.seq_len={seq}"] + extra


def train_check() -> dict:
    from scripts.bench.bench_precision import train_flops_per_token

    name, path, overrides = one_billion_config(["train.precision=bf16", f"train.steps={TRAIN_WARMUP + TRAIN_STEPS}"])
    t = _trainer(path, overrides, "cuda")
    params = sum(p.numel() for p in t.model.parameters())
    for _ in range(TRAIN_WARMUP):
        t.train_step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        t.train_step()
    _sync()
    tokens_s = t.cfg.train.global_batch_size * t.cfg.data.seq_len * TRAIN_STEPS / (time.perf_counter() - t0)
    useful_tflops = train_flops_per_token(t.cfg) * tokens_s / 1e12
    peak = measured_bf16_tflops()
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    del t
    torch.cuda.empty_cache()
    return {"model": name, "total_params": params, "tokens_per_s": tokens_s, "useful_tflops": useful_tflops,
            "measured_bf16_gemm_tflops": peak, "mfu_vs_measured_gemm": useful_tflops / peak,
            "mfu_vs_nominal": useful_tflops / nominal if nominal else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def grouped_gemm_check(S: int = 8, D: int = 1024, F: int = 320, rows: int = 16384, reps: int = 10) -> dict:
    from moetrain.model.moe.experts import GroupedExperts, use_grouped_mm

    experts = GroupedExperts(list(range(S)), D, F, seed=1, layer_index=0, init_std=0.02).cuda()
    gen = torch.Generator().manual_seed(0)
    counts = torch.distributions.Dirichlet(torch.ones(S)).sample() * rows  # uneven groups
    tps = [int(c) for c in counts]
    tps[-1] += rows - sum(tps)
    x = torch.randn(rows, D, generator=gen).cuda()
    out, times = {}, {}
    for mode, allow in (("grouped", True), ("loop", False)):
        experts.allow_grouped_mm = allow
        xi = x.clone().requires_grad_(True)
        for i in range(reps + 2):
            if i == 2:
                _sync()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = experts(xi, tps)
            y.float().square().mean().backward()
        _sync()
        times[mode] = (time.perf_counter() - t0) / reps
        out[mode] = y.float()
    rel = float((out["grouped"] - out["loop"]).norm() / out["loop"].norm())
    return {"grouped_available": use_grouped_mm(x.bfloat16(), F), "grouped_ms": times["grouped"] * 1e3,
            "loop_ms": times["loop"] * 1e3, "loop_over_grouped": times["loop"] / times["grouped"],
            "rel_diff": rel}


def cpu_vs_gpu_check() -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    overrides = ["cluster.num_workers=1", "logging.wandb=disabled", "train.precision=fp32",
                 f"train.steps={TINY_STEPS}", "train.eval_every=0"]
    runs = {}
    for device in ("cpu", "cuda"):
        t = _trainer(None, overrides, device)
        losses = [t.train_step().loss for _ in range(TINY_STEPS)]
        runs[device] = (losses, t.export_tensors("param"))
    (lc, pc), (lg, pg) = runs["cpu"], runs["cuda"]
    rel = max(float(np.linalg.norm(pg[k] - pc[k]) / max(np.linalg.norm(pc[k]), 1e-12)) for k in pc)
    return {"max_loss_diff": float(np.max(np.abs(np.subtract(lc, lg)))), "max_param_rel_err": rel}


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "note": "no CUDA device: nothing measured (the CPU path needs none)"}))
        return 0
    t0 = time.perf_counter()
    result = {"cuda": True, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "capability": list(torch.cuda.get_device_capability())}
    for key, fn in (("cpu_vs_gpu", cpu_vs_gpu_check), ("grouped_gemm", grouped_gemm_check), ("train", train_check)):
        try:
            result[key] = fn()
        except Exception as exc:  # report every part, even when one fails
            result[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result))
    return 0 if all("error" not in v for v in result.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
