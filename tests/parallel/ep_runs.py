"""Shared runner for the bf16 and activation-checkpointing equivalence tests: the real
``RankTrainer`` on a real gloo group (``tests.gloo.run_gloo``, no Ray: cheaper) against one
process running the same code on the same global batches.

``run_ranks(cfg_dicts, placement_json, steps)`` trains each config in turn in the same gloo
processes (spawning is the slow part) and returns, per config, per rank: (losses per step,
final-step gradients, parameters after ``steps`` steps, (all-to-all calls in forward, in
backward, float payload dtypes)) with tensors keyed placement-independently (``RankTrainer.export_tensors``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from moetrain.config import from_dict


def tiny_cfg(cache_dir: str, num_workers: int, *, precision: str = "fp32", checkpointing: str = "none",
             steps: int = 4, **model) -> dict:
    """3 blocks (block 0 dense, 1 and 2 MoE with one shared expert), 8 experts top-2."""
    return {
        "model": {"dim": 32, "n_layers": 3, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32, "first_moe_layer": 1,
                          "num_shared_experts": 1}, **model},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000, "cache_dir": cache_dir},
        "train": {"steps": steps, "global_batch_size": 8, "grad_accum_steps": 2, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 0, "precision": precision, "activation_checkpointing": checkpointing,
                  "loss": {"lbl_coeff": 0.01, "lbl_scope": "global", "z_loss_coeff": 1e-3}},
        "cluster": {"num_workers": num_workers, "run_name": "eq", "cpus_per_worker": 1},
        "logging": {"wandb": "disabled"},
    }


class A2ACounter:
    """Counts ``dist.all_to_all_single`` calls and records the dtypes of their floating-point
    payloads (the real collective still runs) while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self.float_dtypes: set[torch.dtype] = set()
        self._real = dist.all_to_all_single

    def __enter__(self):
        def counting(output, input, *args, **kwargs):
            self.calls += 1
            if input.is_floating_point():
                self.float_dtypes.add(input.dtype)
            return self._real(output, input, *args, **kwargs)

        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._real


def instrumented_step(trainer) -> tuple[int, int, set]:
    """One forward + backward of the trainer's first micro-batch: (all-to-alls in forward,
    all-to-alls in backward, dtypes of all floating-point payloads). Zeroes the gradients."""
    from moetrain import losses

    mb = trainer._micro_batches()[0]
    x = torch.from_numpy(mb[:, :-1]).long()
    y = torch.from_numpy(mb[:, 1:]).long()
    with A2ACounter() as fwd:
        logits, routing = trainer._forward(x)
        loss = losses.lm_loss(logits, y)
    with A2ACounter() as bwd:
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return fwd.calls, bwd.calls, fwd.float_dtypes | bwd.float_dtypes


def _train(ctx, cfg_dict: dict, placement_json: str | None, steps: int, count: bool):
    from moetrain.train.trainer import RankTrainer
    from placement.placement import Placement

    placement = Placement.from_json(placement_json) if placement_json else None
    t = RankTrainer(from_dict(cfg_dict), ctx=ctx, placement=placement)  # ctx None: one process
    counts = (0, 0, set())
    if count:
        cursor = t.cursor.state_dict()
        counts = instrumented_step(t)
        t.cursor.load_state_dict(cursor)
    losses = [t.train_step().loss for _ in range(steps)]
    return losses, t.export_tensors("grad"), t.export_tensors("param"), counts


def _train_each(ctx, cfg_dicts: list[dict], placement_json: str, steps: int, count: bool):
    return [_train(ctx, cfg, placement_json, steps, count) for cfg in cfg_dicts]


def run_ranks(cfg_dicts: list[dict], placement_json: str, steps: int, *, count: bool = False) -> list[list]:
    from tests.gloo import run_gloo

    per_rank = run_gloo(_train_each, cfg_dicts[0]["cluster"]["num_workers"], cfg_dicts, placement_json, steps, count)
    return [[rank[i] for rank in per_rank] for i in range(len(cfg_dicts))]


def run_single(cfg_dict: dict, steps: int):
    """One process (no torch.distributed), same global batches."""
    single = {**cfg_dict, "cluster": {**cfg_dict["cluster"], "num_workers": 1}}
    torch.set_num_threads(1)
    return _train(None, single, None, steps, False)[:3]


def merge(ranks) -> tuple[list[float], dict, dict]:
    """Losses of rank 0 (identical on every rank) and the union of the ranks' tensors."""
    grads, params = {}, {}
    for _, g, p, _ in ranks:
        grads.update(g)
        params.update(p)
    return ranks[0][0], grads, params


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def worst_rel_err(got: dict, ref: dict) -> float:
    assert set(got) == set(ref), "every dense tensor and every logical expert must be present"
    return max(rel_err(got[k], ref[k]) for k in ref)
