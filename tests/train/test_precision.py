"""train.precision: resolution of auto / fp32 / bf16, the fp32 islands of a bf16 run (router,
losses, master weights, optimizer state), bf16 where it matters (expert GEMMs, payloads), the
exit-2 error for bf16 without native bf16, and a bf16 loss curve that tracks fp32."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain import losses
from moetrain.config import ConfigError, load_config
from moetrain.model import Transformer
from moetrain.model.moe.dispatcher import LocalDispatcher
from moetrain.precision import autocast, bf16_native, resolve_precision

ROOT = Path(__file__).resolve().parents[2]
EMULATED_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # oneDNN then emulates bf16: 0.9 GFLOP/s measured


def test_fp32_always_and_auto_follows_the_native_check():
    assert resolve_precision("fp32", "cpu") == torch.float32
    native, why = bf16_native("cpu")
    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if native else torch.float32), why


def test_capped_onednn_makes_bf16_non_native(monkeypatch):
    """With oneDNN capped below bf16 instructions, auto is fp32 and bf16 is a ConfigError
    naming train.precision."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    native, why = bf16_native("cpu")
    assert not native and "ONEDNN_MAX_CPU_ISA=AVX512_CORE" in why
    assert resolve_precision("auto", "cpu") == torch.float32
    with pytest.raises(ConfigError, match=r"^train\.precision \(bf16\) needs native bf16"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(ConfigError, match=r"train\.precision \('fp16'\)"):
        resolve_precision("fp16", "cpu")


def test_bf16_compute_with_fp32_router_losses_and_master_weights():
    if not bf16_native("cpu")[0]:
        pytest.skip("this CPU has no native bf16")
    cfg = load_config(None, ["model.vocab_size=300", "model.moe.num_shared_experts=1"]).model
    model = Transformer(cfg, seed=1)
    seen = {}

    def record(name):
        def hook(module, inputs, output) -> None:
            seen[name] = output.dtype
        return hook

    model.blocks[0].ffn.experts.register_forward_hook(record("experts"))
    model.blocks[0].attn.register_forward_hook(record("attn"))
    x = torch.randint(0, 300, (2, 16))
    with autocast(torch.bfloat16, "cpu"):
        logits, routing = model(x)
        x_TD = torch.randn(5, cfg.dim)
        rows_ND, _ = LocalDispatcher(list(range(8)), 8, 0.0).dispatch(x_TD, routing[0].topk_ids_TK[:5],
                                                                      routing[0].topk_weights_TK[:5])
    assert seen == {"experts": torch.bfloat16, "attn": torch.bfloat16}, "matmuls must run in bf16"
    assert rows_ND.dtype == torch.bfloat16, "dispatched payload rows travel in bf16"
    assert logits.dtype == torch.float32
    for r in routing:
        for t in (r.logits_TE, r.scores_TE, r.topk_weights_TK):
            assert t.dtype == torch.float32, "router logits / softmax / weights stay fp32"
    lm = losses.lm_loss(logits, x)
    lbl = losses.load_balancing_loss(routing[0].scores_TE, losses.expert_counts(routing[0].topk_ids_TK, 8), 32, 2)
    zl = losses.z_loss(routing[0].logits_TE)
    assert {lm.dtype, lbl.dtype, zl.dtype} == {torch.float32}
    (lm + lbl + zl).backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is None or p.grad.dtype == torch.float32, name


@pytest.mark.slow
def test_bf16_loss_curve_tracks_fp32_on_the_bundled_corpus():
    """30 steps of the shipped tiny model on one process. The first steps differ by rounding
    only (~1e-4); afterwards the two trajectories drift apart slowly. Measured: max |delta|
    0.025 nats at step 20 (losses ~6.5), mean 0.004. Bounds: every step within 0.05 nats, the
    mean within 0.01, and both curves fall by > 1 nat: a bf16 run that learns visibly worse
    (e.g. bf16 master weights losing small updates) or diverges fails."""
    from moetrain.train.trainer import RankTrainer

    if not bf16_native("cpu")[0]:
        pytest.skip("this CPU has no native bf16")
    torch.set_num_threads(1)
    curves = {}
    for p in ("fp32", "bf16"):
        cfg = load_config(None, [f"train.precision={p}", "cluster.num_workers=1", "logging.wandb=disabled",
                                 "train.steps=30", "train.warmup_steps=5"])
        trainer = RankTrainer(cfg)
        assert trainer.compute_dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[p]
        curves[p] = np.array([trainer.train_step().loss for _ in range(30)])
    delta = np.abs(curves["bf16"] - curves["fp32"])
    assert delta.max() < 0.05 and delta.mean() < 0.01, np.round(delta, 4)
    assert delta[:5].max() < 1e-3, "the first steps differ by rounding only"
    for p, c in curves.items():
        assert c[-1] < c[0] - 1.0, (p, c)
    state = next(iter(trainer.optimizer.state.values()))
    assert {v.dtype for v in state.values() if v.is_floating_point() and v.ndim > 0} == {torch.float32}


def test_cli_refuses_bf16_without_native_bf16_before_any_actor(tmp_path):
    env = {**os.environ, **EMULATED_BF16, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--set", "train.precision=bf16",
                           "--set", f"logging.out_dir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("moetrain: error:")]
    assert len(lines) == 1 and "train.precision (bf16) needs native bf16" in lines[0], proc.stderr[-2000:]
