"""The grouped-GEMM expert path (``torch._grouped_mm``; used on CUDA sm90+ in bf16) against the
slot loop. Its offsets and its call conventions are checked on CPU (forward only: the CPU
kernel has no backward); the full forward + backward on a GPU, skipped without one."""

from __future__ import annotations

import pytest
import torch

from moetrain.model.moe.experts import (GroupedExperts, group_end_offsets, grouped_mm_aligned, grouped_swiglu,
                                        looped_swiglu, use_grouped_mm)

TOKENS_PER_SLOT = [3, 0, 5, 1]  # an empty slot in the middle


def test_group_end_offsets_by_hand():
    assert group_end_offsets(TOKENS_PER_SLOT).tolist() == [3, 3, 8, 9]
    assert group_end_offsets(TOKENS_PER_SLOT).dtype == torch.int32
    assert group_end_offsets([0, 0]).tolist() == [0, 0]
    with pytest.raises(ValueError, match="negative"):
        group_end_offsets([2, -1])


def _weights(S=4, D=8, F=12, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(9, D), make(S, F, D), make(S, F, D), make(S, D, F)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_grouped_forward_equals_loop_on_cpu():
    x, wg, wu, wd = _weights()
    with torch.no_grad():
        got = grouped_swiglu(x, TOKENS_PER_SLOT, wg, wu, wd)
        want = looped_swiglu(x, TOKENS_PER_SLOT, wg, wu, wd)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_never_takes_the_grouped_path_and_alignment_is_checked():
    assert not use_grouped_mm(torch.zeros(4, 8, dtype=torch.bfloat16), 16)
    assert not use_grouped_mm(torch.zeros(4, 8), 16)
    assert grouped_mm_aligned(64, 128, torch.bfloat16)
    assert not grouped_mm_aligned(64, 12, torch.bfloat16)  # 24-byte rows
    assert grouped_mm_aligned(8, 12, torch.float32)  # 32- and 48-byte rows


@pytest.mark.gpu
def test_grouped_equals_loop_forward_backward_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    experts = GroupedExperts([0, 1, 2, 3], 64, 128, seed=1, layer_index=0, init_std=0.02).cuda()
    x = torch.randn(sum(TOKENS_PER_SLOT) * 16, 64, device="cuda")
    tps = [n * 16 for n in TOKENS_PER_SLOT]
    results = []
    for allow in (True, False):
        experts.allow_grouped_mm = allow
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = experts(xi, tps)
        y.float().square().sum().backward()
        results.append((y.float(), xi.grad, experts.w_gate_SFD.grad.clone()))
    if not use_grouped_mm(x.bfloat16(), 128):
        pytest.skip("this GPU / torch uses the loop (needs sm90 and torch._grouped_mm)")
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16, different GEMM kernels
