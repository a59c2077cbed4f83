"""bf16 on CPU: each slot's rows are padded with zero rows to a multiple of BF16_CPU_ROW_BUCKET
before the expert GEMMs (oneDNN builds and caches one primitive per row count), and only the real
rows come back. Positions by hand, the padded computation equals the unpadded one with every
gradient (fp32, so the comparison is tight), and under bf16 autocast every expert GEMM sees a
bucketed row count while fp32 keeps the real counts."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.model import GroupedExperts
from moetrain.model.moe.experts import BF16_CPU_ROW_BUCKET, bucketed, looped_swiglu, padded_rows


def test_padded_positions_by_hand():
    padded, pos = padded_rows([3, 0, 5, 4], 4)
    assert padded == [4, 0, 8, 4]
    # slot 0 rows 0-2 at 0-2; slot 2 starts at 4: 4-8; slot 3 starts at 4 + 8 = 12: 12-15
    assert pos.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12, 13, 14, 15]


def test_bucketed_equals_unpadded_with_gradients():
    ex = GroupedExperts([0, 1, 2], 8, 16, seed=0, layer_index=0, init_std=0.3)
    counts = [5, 0, 3]
    x = torch.randn(8, 8, requires_grad=True)
    gy = torch.randn(8, 8)
    weights = (ex.w_gate_SFD, ex.w_up_SFD, ex.w_down_SDF)
    ref = looped_swiglu(x, counts, *weights)
    grads_ref = torch.autograd.grad(ref, (x, *weights), gy)
    out = bucketed(looped_swiglu, 4, x, counts, *weights)
    grads = torch.autograd.grad(out, (x, *weights), gy)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    assert grads[1][1].abs().sum() == 0  # the empty slot's weights get nothing, padded or not


class MatmulRows(TorchDispatchMode):
    """Records the row count (first dim of the left operand) of every mm / addmm."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            left = args[1] if func is torch.ops.aten.addmm.default else args[0]
            self.rows.append(left.shape[0])
        return func(*args, **(kwargs or {}))


def expert_gemm_rows(dtype_autocast: bool) -> list[int]:
    ex = GroupedExperts([0, 1], 32, 48, seed=0, layer_index=0, init_std=0.1)
    x = torch.randn(100 + 37, 32)
    with MatmulRows() as mode:
        if dtype_autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = ex(x, [100, 37])
        else:
            y = ex(x, [100, 37])
    return mode.rows, y


def test_bf16_expert_gemms_see_bucketed_rows_fp32_the_real_ones():
    rows, y = expert_gemm_rows(True)
    assert y.dtype == torch.bfloat16 and y.shape == (137, 32)
    b = BF16_CPU_ROW_BUCKET
    assert sorted(set(rows)) == sorted({-(-100 // b) * b, -(-37 // b) * b})
    rows, _ = expert_gemm_rows(False)
    assert sorted(set(rows)) == [37, 100]
