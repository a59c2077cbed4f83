"""Activation checkpointing (``train.activation_checkpointing``) on real gloo groups.

``block`` and ``attention`` recompute only collective-free regions (attention sub-blocks, the
dense FFN sub-block, and in MoE blocks the norm, router, expert SwiGLU internals and shared
experts), so on 2 and 4 ranks with a non-contiguous placement they give the losses, gradients
and parameters of ``none`` (fp32, 1e-5), run exactly as many all-to-alls in forward and in
backward as ``none`` (recompute never re-runs one), and keep fewer activation bytes.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.config import from_dict
from moetrain.model import Transformer
from moetrain.train.activation_memory import model_activation_bytes
from placement.placement import Placement
from tests.parallel.ep_runs import merge, run_ranks, tiny_cfg, worst_rel_err

RTOL = 1e-5
STEPS = 3
A2A_PER_MOE_LAYER_FWD = 4  # split sizes, payload, slot ids (dispatch) + the combine
A2A_PER_MOE_LAYER_BWD = 2  # the reverse of the two autograd all-to-alls (payload, combine)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [2, 4])
def test_checkpointing_equals_none_on_ranks_and_runs_no_extra_collective(cache_dir, num_workers):
    placement = Placement.random(2, 8, num_workers, seed=7).to_json()
    modes = ("none", "block", "attention")
    cfgs = [tiny_cfg(cache_dir, num_workers, checkpointing=mode, steps=STEPS) for mode in modes]
    runs = dict(zip(modes, run_ranks(cfgs, placement, STEPS, count=True)))
    ref_losses, ref_grads, ref_params = merge(runs["none"])
    assert ref_losses[-1] < ref_losses[0], "the reference run should learn"
    for mode in ("block", "attention"):
        losses, grads, params = merge(runs[mode])
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=0)
        assert worst_rel_err(grads, ref_grads) < RTOL, mode
        assert worst_rel_err(params, ref_params) < RTOL, mode
    for mode, ranks in runs.items():
        for rank, (*_, (fwd, bwd, _)) in enumerate(ranks):
            assert (fwd, bwd) == (2 * A2A_PER_MOE_LAYER_FWD, 2 * A2A_PER_MOE_LAYER_BWD), (mode, rank, fwd, bwd)


def _model(mode: str, cache_dir: str) -> Transformer:
    cfg = from_dict(tiny_cfg(cache_dir, 1)).model
    m = Transformer(cfg.__class__(**{**cfg.__dict__, "vocab_size": 300}), seed=3)
    m.apply_activation_checkpointing(mode)
    return m


def test_checkpointing_keeps_fewer_activation_bytes_and_same_gradients(cache_dir):
    """One process: ``attention`` < ``none`` and ``block`` < ``attention`` in saved bytes, and
    the same gradients (so the regions really are recomputed, not dropped)."""
    x = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    sizes, grads = {}, {}
    for mode in ("none", "attention", "block"):
        m = _model(mode, cache_dir)
        sizes[mode] = model_activation_bytes(m, x)
        grads[mode] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert sizes["block"] < sizes["attention"] < sizes["none"], sizes
    for mode in ("attention", "block"):
        assert grads[mode].keys() == grads["none"].keys()
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=RTOL, atol=1e-7)
