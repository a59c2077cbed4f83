"""bf16 expert parallelism equals one bf16 process, within a stated bf16 tolerance.

Real ``RankTrainer`` on real gloo groups of 2 and 4 ranks, a non-contiguous (random) placement,
``train.precision: bf16`` (fp32 master weights, bf16 autocast, bf16 all-to-all payloads:
checked on every collective), against one process running the same code on the same global batches, 4 AdamW steps.

Tolerance, and why. bf16 keeps 8 significant bits: unit roundoff u = 2^-9 ~ 2e-3. The forward
rounds the same values in the same order on R ranks and on one process (the per-unit combine
sums of top-2 rows round like the one-process sum), so the losses agree to ~1e-5 relative.
Where EP and one process must differ is the weight gradient: a bf16 GEMM rounds dW = X^T dY
to bf16 once per rank (R partial sums, then the fp32 all-reduce) where one process rounds the
full sum once: a per-element relative difference of up to ~2u. Measured (loss abs / gradient
and parameter relative errors over all tensors together): 2 ranks 7.4e-5 / 3.4e-3 / 1.4e-3,
4 ranks 6.8e-5 / 3.7e-3 / 1.4e-3; bf16 vs fp32 on one process: 9.5e-5 / 5.5e-3 / 4.4e-3.
Bounds: loss 1e-3 absolute (losses ~5.7), gradients 10u = 2e-2, parameters 5u = 1e-2: a few
times the measured values, far below what a routing or payload bug gives (O(1)). The fp32
equivalence tests (test_equivalence.py) keep 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placement.placement import Placement
from tests.parallel.ep_runs import merge, run_ranks, run_single, tiny_cfg

STEPS = 4
BF16_U = 2.0 ** -9
LOSS_ATOL = 1e-3
GRAD_RTOL = 10 * BF16_U
PARAM_RTOL = 5 * BF16_U


def global_rel_err(got: dict, ref: dict) -> float:
    """||got - ref|| / ||ref|| over all tensors together."""
    assert set(got) == set(ref), "every dense tensor and every logical expert must be present"
    diff = sum(float(np.sum((got[k] - ref[k]) ** 2)) for k in ref)
    return float(np.sqrt(diff / sum(float(np.sum(ref[k] ** 2)) for k in ref)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="module")
def bf16_reference(cache_dir):
    return run_single(tiny_cfg(cache_dir, 1, precision="bf16", steps=STEPS), STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [2, 4])
def test_bf16_expert_parallel_equals_single_process(cache_dir, bf16_reference, num_workers):
    cfg = tiny_cfg(cache_dir, num_workers, precision="bf16", steps=STEPS)
    placement = Placement.random(2, 8, num_workers, seed=7)
    assert not np.array_equal(placement.phy2log_LS, Placement.contiguous(2, 8, num_workers).phy2log_LS)
    ranks = run_ranks([cfg], placement.to_json(), STEPS, count=True)[0]
    assert all(r[3][2] == {torch.bfloat16} for r in ranks), "all-to-all payloads must travel in bf16"
    losses, grads, params = merge(ranks)
    ref_losses, ref_grads, ref_params = bf16_reference
    assert ref_losses[-1] < ref_losses[0], "the reference run should learn"
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=LOSS_ATOL)
    assert global_rel_err(grads, ref_grads) < GRAD_RTOL
    assert global_rel_err(params, ref_params) < PARAM_RTOL
