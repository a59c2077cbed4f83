"""DeepSpeed ZeRO stage 1/2 for the dense parameters of one rank (``train.zero_stage``).

Owns: the dense half of the optimizer when ``train.zero_stage`` is 1 or 2. The data-parallel
group is all ranks. Expert parameters are not DeepSpeed's: they keep moetrain's reduction over
their replicas (:mod:`moetrain.parallel.grads`) and a local AdamW in the trainer.

Why not DeepSpeed's MoE parameter groups: DeepSpeed reduces an expert parameter over a fixed
"expert data parallel" group (ranks ``r, r + ep_size, ...``): every expert tensor of a rank is
replicated the same number of times, on a regular grid. moetrain's placements give each logical
expert its own replica count and ranks (``Placement.logcnt_LE``), so one expert tensor of a rank
mixes experts reduced over different rank sets; no DeepSpeed group layout expresses that
(``scripts/experiments/zero_moe_groups.py`` prints the groups DeepSpeed builds).

How the update stays the stage-0 update, in exact math:
- DeepSpeed averages the dense gradients over all ranks (sum / world size), like
  :func:`~moetrain.parallel.grads.sync_dense_grads`;
- the clipping norm is the *global* norm: DeepSpeed's dense norm (over its partitions, each
  element once) combined with the expert sum of squares the trainer passes in, by replacing the
  optimizer's ``scaled_global_norm`` on this instance; DeepSpeed then clips its partitions with
  ``max_norm / (norm + 1e-6)`` like :func:`~moetrain.parallel.grads.clip_grads_`;
- a step the trainer must skip (non-finite loss) reports an infinite norm, which makes
  DeepSpeed skip its whole update on every rank (the norm is all-reduced, so all ranks agree);
- the same AdamW (``torch_adam``, decoupled weight decay on parameters with ndim >= 2, betas and
  eps of the config) runs on this rank's slice of each group's flat fp32 buffer; AdamW is
  element-wise, so the slice update equals the full update;
- the learning rate is set on every group before each step.

Checkpoint layout: :meth:`DenseZero.gather_state` all-gathers the partitions into the stage-0
layout (``{param name: {"step", "exp_avg", "exp_avg_sq"}}``), and :meth:`DenseZero.load_state`
takes this rank's slice of such a dict; so ``dense.pt`` is the same for every stage and world size.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import ConfigError

ZERO_STAGES = (1, 2)
# DeepSpeed's default bucket sizes: the dense state of our presets fits in one bucket, so the
# reduction runs once at the end of backward (after every expert all-to-all of the step).
REDUCE_BUCKET_ELEMS = 500_000_000
ALLGATHER_BUCKET_ELEMS = 500_000_000
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, the stage-0 optimizer's eps
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
DS_LOG_LEVEL = logging.WARNING  # DeepSpeed logs every bucket size and memory figure at INFO


class _DenseShell(nn.Module):
    """Holds the dense Parameters (the very objects of the model) for DeepSpeed's engine."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, *args):  # never called: the trainer runs the full model
        raise RuntimeError("the dense shell module is not run")


def ds_config(stage: int, *, lr: float, beta1: float, beta2: float, grad_clip: float) -> dict:
    """The DeepSpeed config of the dense optimizer (fp32, unmanaged accumulation: backward
    accumulates, :meth:`DenseZero.step` is the accumulation boundary)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max(grad_clip, 0.0),
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [beta1, beta2], "eps": ADAM_EPS, "weight_decay": 0.0, "torch_adam": True},
        },
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": stage == 2,
            "reduce_scatter": True,
            "reduce_bucket_size": REDUCE_BUCKET_ELEMS,
            "allgather_bucket_size": ALLGATHER_BUCKET_ELEMS,
            "round_robin_gradients": False,
        },
    }


def check_zero_supported(stage: int) -> None:
    """Refuse, before any actor starts, a ``train.zero_stage`` this installation cannot give."""
    import importlib.util

    if stage in ZERO_STAGES and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"train.zero_stage ({stage}) needs DeepSpeed, which is not installed here "
            "(pip install deepspeed), or set train.zero_stage=0"
        )
    if stage not in (0, *ZERO_STAGES):
        raise ConfigError(f"train.zero_stage ({stage}) must be 0 (off), 1 or 2")


def _ensure_process_group(world_size: int, device: torch.device) -> None:
    """DeepSpeed needs torch.distributed: a single process gets a one-rank group (gloo on CPU,
    NCCL on a GPU: DeepSpeed's collectives then run on CUDA tensors)."""
    if dist.is_initialized():
        return
    if world_size != 1:
        raise RuntimeError("train.zero_stage > 0 on several ranks needs their process group first")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def forget_process_groups() -> None:
    """Drop what DeepSpeed cached of the process group (its comm backend, its world and parallel
    groups) when this process leaves it for a new one (an in-place resize): the next
    :class:`DenseZero` binds to the group then current. A no-op when DeepSpeed was never imported."""
    import sys

    if "deepspeed" not in sys.modules:
        return
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        setattr(groups, name, {})
    for name in (
        "_WORLD_GROUP",
        "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
        "_TENSOR_MODEL_PARALLEL_GROUP",
        "_MODEL_PARALLEL_GROUP",
        "_DATA_PARALLEL_GROUP",
        "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
        "_MPU_TENSOR_MODEL_PARALLEL_RANK",
    ):
        setattr(groups, name, None)


class DenseZero:
    """DeepSpeed ZeRO-``stage`` optimizer of the dense parameters (see the module doc)."""

    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        *,
        stage: int,
        lr: float,
        beta1: float,
        beta2: float,
        weight_decay: float,
        grad_clip: float,
        world_size: int,
        device: torch.device = torch.device("cpu"),
    ):
        if stage not in ZERO_STAGES:
            raise ConfigError(f"train.zero_stage ({stage}) must be 0 (off), 1 or 2 here")
        _ensure_process_group(world_size, device)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's CPU accelerator reads it
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(DS_LOG_LEVEL)
        self.stage = stage
        self._names = {id(p): n for n, p in named_params}  # the Parameter objects DeepSpeed keeps
        params = [p for _, p in named_params]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        cfg = ds_config(stage, lr=lr, beta1=beta1, beta2=beta2, grad_clip=grad_clip)
        try:
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=_DenseShell(params), model_parameters=groups, config=cfg, dist_init_required=False
            )
        except (AssertionError, ValueError, RuntimeError) as exc:  # a setting DeepSpeed refuses
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"train.zero_stage ({stage}): DeepSpeed refuses this run: {first}") from exc
        self.base_optimizer: torch.optim.Optimizer = self.zero.optimizer  # AdamW over the flat slices
        self._extra_sq = torch.zeros(())
        self._force_skip = False
        self.last_norm = math.nan
        ds_norm = self.zero.scaled_global_norm

        def global_norm(norm_type: int = 2) -> torch.Tensor:
            dense = ds_norm(norm_type)  # all-reduced over ranks; -1 (or inf) when not finite
            valid = bool(torch.isfinite(dense)) and float(dense) >= 0
            total = (dense.float().pow(2) + self._extra_sq.to(dense.device)).sqrt()
            self.last_norm = float(total) if valid else math.nan
            if self._force_skip or not math.isfinite(self.last_norm):
                return torch.full_like(dense, math.inf)  # DeepSpeed skips the step on every rank
            return total.to(dense.dtype)

        self.zero.scaled_global_norm = global_norm  # this instance only: the norm includes the experts

    # ---- one step -------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the full model's loss (expert gradients accumulate in ``p.grad`` as usual)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, *, lr: float, expert_sq: torch.Tensor, skip: bool) -> tuple[float, bool]:
        """Reduce, clip by the global norm and update the dense parameters (collective).
        ``expert_sq``: the all-reduced sum of squares of the expert gradients. Returns the global
        gradient norm and whether the update was applied (False: skipped on every rank)."""
        self.zero.set_lr(lr)
        self._extra_sq, self._force_skip, self.last_norm = expert_sq.detach().float().cpu(), skip, math.nan
        self.engine.step()
        applied = not bool(self.zero.overflow)
        return self.last_norm, applied

    def zero_grad(self) -> None:
        self.zero.zero_grad(set_to_none=True)

    # ---- state ----------------------------------------------------------------------------------
    def _layout(self):
        """Per group: (params in flat order, element offset of each, partition size)."""
        out = []
        for i, group in enumerate(self.zero.round_robin_bit16_groups):
            offsets = self.zero.round_robin_bit16_offsets[i]
            out.append((group, offsets, int(self.zero.partition_size[i])))
        return out

    def state_bytes(self) -> int:
        """Bytes of this rank's live optimizer state (AdamW moments of its slices)."""
        total = 0
        for st in self.base_optimizer.state.values():
            total += sum(v.numel() * v.element_size() for k, v in st.items() if torch.is_tensor(v) and k != "step")
        return total

    def _flat_slices(self, i: int):
        return self.zero.single_partition_of_fp32_groups[i]

    @torch.no_grad()
    def gather_state(self) -> dict[str, dict]:
        """The AdamW state of every dense parameter by name, stage-0 layout (collective: every
        rank must call it; every rank gets the full dict). Empty before the first step."""
        names = self._names
        out: dict[str, dict] = {}
        for i, (group, offsets, psize) in enumerate(self._layout()):
            st = self.base_optimizer.state.get(self._flat_slices(i), {})
            if not st:
                continue
            world = dist.get_world_size()
            for key in ADAM_STATE_KEYS:
                parts = [torch.empty(psize, dtype=st[key].dtype, device=st[key].device) for _ in range(world)]
                dist.all_gather(parts, st[key].detach().contiguous())
                flat = torch.cat(parts)
                for p, off in zip(group, offsets):
                    out.setdefault(names[id(p)], {})[key] = flat[off : off + p.numel()].view_as(p).cpu().clone()
            for p in group:
                out[names[id(p)]]["step"] = st["step"].clone()
        return out

    @torch.no_grad()
    def load_state(self, params: dict[str, torch.Tensor], optim: dict[str, dict]) -> None:
        """Set the dense weights (``params`` by name) and, when ``optim`` has them, this rank's
        slices of the AdamW state from the stage-0 layout. The model's dense parameters are views
        of DeepSpeed's flat buffers: write them there and refresh the fp32 master slices."""
        names = self._names
        rank = dist.get_rank()
        for i, (group, offsets, psize) in enumerate(self._layout()):
            for p in group:
                p.data.copy_(params[names[id(p)]])
            master = self._flat_slices(i)
            master.data.copy_(self.zero.parallel_partitioned_bit16_groups[i][rank].data)
            if not all(names[id(p)] in optim for p in group):
                continue
            lo, hi = rank * psize, (rank + 1) * psize
            state = {"step": optim[names[id(group[0])]]["step"].clone()}
            for key in ADAM_STATE_KEYS:
                flat = torch.zeros(psize * dist.get_world_size(), dtype=master.dtype, device=master.device)
                for p, off in zip(group, offsets):
                    flat[off : off + p.numel()] = optim[names[id(p)]][key].reshape(-1).to(master.device)
                state[key] = flat[lo:hi].clone()
            self.base_optimizer.state[master] = state

    def close(self) -> None:
        self.engine.destroy()
