"""The expert-parallel result equals the single-process result, for any placement.

Real Ray actors (``cluster.group.WorkerGroup``), real gloo all-to-all, real bundled text. For each
variant, N ranks train 10 steps (dropless, gradient accumulation, global LBL + z-loss) and must
match one process running the same code on the same global batches: per-step losses, the final
step's gradients and the parameters after 10 AdamW steps, expert by expert. The variants cover
placements (contiguous, random, uneven, replicated), dedup, the aux-loss-free bias, shared
experts and grouped routing.

Capacity dropping is decided per *source rank*: each rank keeps, for every expert, the first
``ceil(cf * T_rank * K / E)`` of its own (token, k) pairs. One process running micro-batches of
R x T_rank tokens applies the capacity to the concatenation instead, so it drops other tokens
(``test_capacity.py`` has a hand-computed case) and the two runs differ. What is equal: N ranks
with A micro-batches each == one process with A x N micro-batches, micro-batch ``a * N + r``
holding exactly rank r's tokens of micro-batch a (``shard_global_batch`` orders the global batch
as [A, N, rows]), because then every capacity decision sees the same T_rank tokens. The LM loss
and the gradients are means over equal-sized micro-batches either way, so they agree; the LBL
must be ``micro`` (or ``sequence``) scope: the global scope's running counts would include all N
ranks of micro-batch a in EP but only ranks 0..r in the one-process split.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrain.config import from_dict
from moetrain.train.trainer import RankTrainer
from placement.placement import Placement

STEPS = 10
RTOL = 1e-5  # relative error (norm of difference / norm of reference) per tensor


def tiny_cfg(cache_dir: str, num_workers: int, *, dedup: bool = True, expert_bias: bool = False,
             lbl_scope: str = "global", slots_per_rank: int = 0, moe: dict | None = None):
    return from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32, "dedup": dedup,
                          "expert_bias": expert_bias, "bias_update_rate": 0.01, **(moe or {})}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000, "cache_dir": cache_dir},
        "train": {"steps": STEPS, "global_batch_size": 8, "grad_accum_steps": 2, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 0, "loss": {"lbl_coeff": 0.01, "lbl_scope": lbl_scope, "z_loss_coeff": 1e-3}},
        "cluster": {"num_workers": num_workers, "run_name": f"eq{num_workers}", "cpus_per_worker": 1},
        "placement": {"slots_per_rank": slots_per_rank},
        "logging": {"wandb": "disabled"},
    })


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def reference(cfg, grad_accum_steps: int | None = None):
    """Single process (no torch.distributed), same code, same global batches (optionally split
    into ``grad_accum_steps`` micro-batches instead of the config's)."""
    d = cfg.to_dict()
    train = {**d["train"], "grad_accum_steps": grad_accum_steps or d["train"]["grad_accum_steps"]}
    single = from_dict({**d, "train": train, "cluster": {**d["cluster"], "num_workers": 1},
                        "placement": {"slots_per_rank": 0}})
    t = RankTrainer(single)
    losses = [t.train_step().loss for _ in range(STEPS)]
    if single.model.moe.capacity_factor > 0:  # the capacity must bind, or the test shows nothing
        x = torch.tensor(t.data.first_train_rows(single.micro_batch_size)[:, :-1], dtype=torch.long)
        assert sum(r.num_dropped for r in t.model(x)[1]) > 0, "no (token, expert) pair was dropped"
    return losses, t.export_tensors("grad"), t.export_tensors("param")


def reference_metrics(cfg, steps: int):
    single = from_dict({**cfg.to_dict(), "cluster": {**cfg.to_dict()["cluster"], "num_workers": 1},
                        "placement": {"slots_per_rank": 0}})
    t = RankTrainer(single)
    metrics = [t.train_step() for _ in range(steps)]
    return metrics, t.routing_stats()


def run_group(cfg, placement):
    from cluster.group import WorkerGroup

    group = WorkerGroup.create(cfg, placement)
    try:
        losses = [group.call("train_step")[0].loss for _ in range(STEPS)]
        grads, params = {}, {}
        for g in group.call("export_tensors", "grad"):
            grads.update(g)
        for p in group.call("export_tensors", "param"):
            params.update(p)
    finally:
        group.shutdown()
    return losses, grads, params


SHARED = {"num_shared_experts": 1}
GROUPED = {"num_groups": 2}  # 8 experts in 2 groups of 4, top-1 of each group

VARIANTS = [
    (1, "contiguous", True, False, None),
    # (num_workers, placement kind, dedup, expert_bias, other model.moe settings)
    (2, "contiguous", True, False, None),
    (2, "random", False, True, None),
    (4, "random", True, False, None),
    (4, "uneven", False, False, None),
    (4, "replicated", True, False, None),
    pytest.param(2, "random", True, False, SHARED, id="2-random-shared"),
    pytest.param(4, "replicated", False, False, GROUPED, id="4-replicated-grouped"),
]


def make_placement(kind: str, num_workers: int) -> Placement:
    if kind == "contiguous":
        return Placement.contiguous(2, 8, num_workers)
    if kind == "random":
        return Placement.random(2, 8, num_workers, seed=7)
    if kind == "uneven":
        return Placement.random(2, 8, num_workers, seed=3, slots_per_rank=[1, 3, 2, 2])
    if kind == "replicated":  # 12 slots for 8 experts: 4 experts have two replicas
        return Placement.random(2, 8, num_workers, seed=5, slots_per_rank=3)
    raise ValueError(kind)


@pytest.mark.ray
@pytest.mark.parametrize("num_workers,kind,dedup,expert_bias,moe", VARIANTS)
def test_expert_parallel_equals_single_process(ray_local, cache_dir, num_workers, kind, dedup, expert_bias, moe):
    placement = make_placement(kind, num_workers)
    cfg = tiny_cfg(cache_dir, num_workers, dedup=dedup, expert_bias=expert_bias, moe=moe,
                   slots_per_rank=placement.slots_per_rank[0] if kind == "replicated" else 0)
    ref_losses, ref_grads, ref_params = reference(cfg)
    losses, grads, params = run_group(cfg, placement)
    assert_same_run(losses, grads, params, ref_losses, ref_grads, ref_params)
    if moe == SHARED:
        assert any("shared" in k for k in grads), "the shared experts must be compared too"


@pytest.mark.ray
def test_capacity_dropping_equals_one_process_with_one_micro_batch_per_rank(ray_local, cache_dir):
    """4 ranks x 2 micro-batches, capacity factor 1.0 (drops happen: checked in ``reference``),
    micro LBL: equals one process running 8 micro-batches, each one rank's tokens (see the module
    docstring), and differs from one process running 2 micro-batches of 4 ranks' tokens."""
    cfg = tiny_cfg(cache_dir, 4, lbl_scope="micro", moe={"capacity_factor": 1.0})
    A, R = cfg.train.grad_accum_steps, cfg.cluster.num_workers
    ref_losses, ref_grads, ref_params = reference(cfg, grad_accum_steps=A * R)
    losses, grads, params = run_group(cfg, make_placement("random", R))
    assert_same_run(losses, grads, params, ref_losses, ref_grads, ref_params)

    concat_losses, _, concat_params = reference(cfg)  # capacity over each 4-rank micro-batch
    assert np.abs(np.subtract(concat_losses, losses)).max() > 1e-4, "capacity over the concatenation drops other tokens"
    assert max(rel_err(params[k], concat_params[k]) for k in concat_params) > 100 * RTOL


def assert_same_run(losses, grads, params, ref_losses, ref_grads, ref_params) -> None:
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert set(grads) == set(ref_grads), "every dense tensor and every logical expert must be present"
    worst_grad = max(rel_err(grads[k], ref_grads[k]) for k in ref_grads)
    worst_param = max(rel_err(params[k], ref_params[k]) for k in ref_params)
    assert worst_grad < RTOL, f"gradients differ: worst relative error {worst_grad:.2e}"
    assert worst_param < RTOL, f"parameters differ after {STEPS} steps: worst relative error {worst_param:.2e}"
    assert ref_losses[-1] < ref_losses[0], "the reference run should learn"


@pytest.mark.ray
@pytest.mark.parametrize("scope", ["global", "micro"])
def test_global_lbl_equals_single_process_and_micro_does_not(ray_local, cache_dir, scope):
    """Global LBL on 4 ranks == one process's LBL on the concatenated global micro-batches.
    Micro LBL on 4 ranks sees only each rank's slice, so it differs (the ranks' data differ)."""
    from cluster.group import WorkerGroup

    cfg = tiny_cfg(cache_dir, 4, lbl_scope=scope)
    ref, ref_stats = reference_metrics(cfg, 3)
    group = WorkerGroup.create(cfg, Placement.random(2, 8, 4, seed=1))
    try:
        ranks = [group.call("train_step") for _ in range(3)]
        stats = group.call("routing_stats")[0]
    finally:
        group.shutdown()
    lbl = np.array([r[0].lbl for r in ranks])
    ref_lbl = np.array([m.lbl for m in ref])
    if scope == "global":
        np.testing.assert_allclose(lbl, ref_lbl, rtol=1e-5)
        # Same trajectory, so the routing statistics gathered on 4 ranks equal the
        # single-process counts of the same batches.
        for key in ("load_LE", "coact_LEE", "trans_LEE"):
            np.testing.assert_array_equal(getattr(stats, key), getattr(ref_stats, key))
    else:
        assert np.abs(lbl - ref_lbl).max() > 1e-6, "micro-batch LBL should differ from the global-batch LBL"
    assert stats.load_LE.sum() == 3 * 8 * 32 * 2 * 2  # steps x seqs x tokens x top_k x layers


@pytest.mark.gpu
@pytest.mark.ray
def test_nccl_equivalence_on_gpu(ray_local, cache_dir):
    """The NCCL path: 2 GPU actors (one GPU each) against the single-process CPU reference."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs >= 2 CUDA GPUs for the NCCL path (this machine has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    if ray_local.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("the local Ray instance sees fewer than 2 GPUs")
    cfg = tiny_cfg(cache_dir, 2)
    cfg = from_dict({**cfg.to_dict(), "cluster": {**cfg.to_dict()["cluster"], "use_gpu": True}})
    ref_losses, ref_grads, ref_params = reference(cfg)
    losses, grads, params = run_group(cfg, Placement.random(2, 8, 2, seed=7))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)  # GPU kernels reduce in another order
    assert max(rel_err(grads[k], ref_grads[k]) for k in ref_grads) < 1e-4
    assert max(rel_err(params[k], ref_params[k]) for k in ref_params) < 1e-4
