"""scripts/gpu_check.sh prints one JSON line; without CUDA it says so and exits 0 (the CPU path
never needs a GPU). The 1B sibling it trains on a GPU is about 1e9 parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_without_cuda_prints_one_json_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check runs in scripts/gpu_check.sh")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["cuda"] is False


def test_the_1b_sibling_has_about_1e9_parameters():
    from moetrain.config import load_config
    from moetrain.model.transformer import count_moe_blocks
    from scripts.tools.gpu_check import one_billion_config

    _, path, overrides = one_billion_config([])
    m = load_config(path, overrides).model
    D, moe, V = m.dim, m.moe, 2048
    n_moe = count_moe_blocks(m)
    total = (m.n_layers * (4 * D * D + 2 * D) + n_moe * moe.num_experts * (3 * D * moe.expert_ffn_dim + D)
             + (m.n_layers - n_moe) * 3 * D * m.ffn_dim + 2 * V * D)
    assert 0.7e9 < total < 1.5e9, total
