"""What a rank saves in a checkpoint, and how a rank of any placement loads it back.

Owns: :class:`RankParts`, the parts of a rank a checkpoint holds (handed over explicitly, never
read off the trainer), and the mapping between those parts and checkpoint objects —
- ``dense.pt`` (written by rank 0 only; dense parameters are identical on every rank): dense
  parameters, persistent buffers (e.g. the aux-loss-free expert bias) and their AdamW state,
  by parameter name. Under ZeRO (``train.zero_stage`` 1/2) every rank holds a slice of that
  state: saving all-gathers it into the same layout (a collective), loading takes this rank's
  slice, so any stage and any world size reads any ``dense.pt``;
- ``experts/layer-<l>/expert-<e>.pt``: one object per logical expert per MoE layer, written by
  the rank holding its primary replica: the three SwiGLU matrices and their AdamW state;
- ``rng/rank-<r>.pt``: this rank's torch RNG state.
A rank of another placement or group size reads ``dense.pt`` and exactly the experts it hosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from moetrain.checkpoint import CheckpointError
from moetrain.model import Transformer
from moetrain.parallel.grads import EXPERT_PARAM_NAMES, expert_params, primary_slot_mask
from placement.placement import Placement

if TYPE_CHECKING:
    from moetrain.train.zero import DenseZero

DENSE = "dense.pt"


def expert_object_name(layer: int, expert: int) -> str:
    return f"experts/layer-{layer}/expert-{expert}.pt"


def _opt_state(optimizer, p) -> dict:
    st = optimizer.state.get(p, {})
    return {k: v for k, v in st.items()}


@dataclass(frozen=True)
class RankParts:
    """What one rank's checkpoint is made of (torchtitan's CheckpointManager is given the same:
    model parts, optimizers, the data position). The placement and the step change while a run
    goes on: they are passed with each call instead."""

    model: Transformer
    optimizer: torch.optim.Optimizer  # AdamW of every parameter (stage 0) or of the experts (ZeRO)
    dense_zero: "DenseZero | None"  # DeepSpeed ZeRO optimizer of the dense parameters, or None
    cursor: Any  # the data position: state_dict() / load_state_dict() (BatchCursor, StreamCursor)
    rank: int


def rank_objects(
    parts: RankParts, placement: Placement, *, with_dense: bool | None = None, replicas: bool = False
) -> dict[str, dict]:
    """Objects this rank writes (tensors are live: the writer snapshots them): ``dense.pt`` on
    rank 0 (or as ``with_dense`` says), the experts whose primary replica it holds (every expert it
    holds with ``replicas``: a recovery from memory takes each expert from any live replica)."""
    model, opt, rank = parts.model, parts.optimizer, parts.rank
    objects: dict[str, dict] = {}
    zero = parts.dense_zero
    dense_optim = zero.gather_state() if zero is not None else None  # collective: every rank
    if (rank == 0) if with_dense is None else with_dense:
        dense = dict(model.dense_parameters())
        if dense_optim is None:
            dense_optim = {n: _opt_state(opt, p) for n, p in dense.items() if p in opt.state}
        objects[DENSE] = {
            "params": {n: p.detach() for n, p in dense.items()},
            "buffers": {n: b for n, b in model.named_buffers() if _persistent(model, n)},
            "optim": dense_optim,
        }
    for idx, layer in enumerate(model.moe_layers()):
        primary = primary_slot_mask(placement, idx, rank)
        local = placement.local_experts(idx, rank)
        for slot, e in enumerate(local):
            if not (primary[slot] or (replicas and expert_object_name(idx, int(e)) not in objects)):
                continue
            obj: dict = {}
            for name, p in zip(EXPERT_PARAM_NAMES, expert_params(layer)):
                obj[name] = p.detach()[slot]
                st = opt.state.get(p, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        obj[f"{k}.{name}"] = st[k][slot]
                if "step" in st:
                    obj["step"] = st["step"]
            objects[expert_object_name(idx, int(e))] = obj
    objects[f"rng/rank-{rank}.pt"] = {"torch": torch.get_rng_state()}
    return objects


def _persistent(model, buffer_name: str) -> bool:
    module_name, _, short = buffer_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return short not in getattr(module, "_non_persistent_buffers_set", set())


def objects_to_read(placement: Placement, rank: int) -> list[str]:
    """Names rank ``rank`` needs: dense state and the experts ``placement`` gives it."""
    names = [DENSE]
    for idx in range(placement.num_layers):
        for e in sorted(set(int(x) for x in placement.local_experts(idx, rank))):
            names.append(expert_object_name(idx, e))
    return names


def _check_shape(obj: str, name: str, saved: torch.Tensor, live: torch.Tensor) -> None:
    if tuple(saved.shape) != tuple(live.shape):
        raise CheckpointError(
            f"{obj}: tensor {name} has shape {tuple(saved.shape)} in the checkpoint but "
            f"{tuple(live.shape)} in this model (a different model config?)"
        )


@torch.no_grad()
def load_rank_objects(parts: RankParts, placement: Placement, read: Callable[[list[str]], dict[str, dict]]) -> None:
    """Load dense + hosted experts (weights and AdamW state) into freshly built parts whose model
    holds the experts ``placement`` gives this rank."""
    model, opt, rank = parts.model, parts.optimizer, parts.rank
    objs = read(objects_to_read(placement, rank))
    dense_obj = objs[DENSE]
    dense = dict(model.dense_parameters())
    missing = sorted(set(dense) - set(dense_obj["params"]))
    if missing:
        raise KeyError(f"checkpoint {DENSE} lacks dense parameters {missing[:5]} (a different model config?)")
    for n, p in dense.items():
        _check_shape(DENSE, n, dense_obj["params"][n], p)
        if parts.dense_zero is not None:
            continue  # below: DeepSpeed's flat buffers and this rank's slices of the state
        p.copy_(dense_obj["params"][n])
        if n in dense_obj["optim"]:
            opt.state[p] = {
                k: (v.clone().to(p.device) if torch.is_tensor(v) else v) for k, v in dense_obj["optim"][n].items()
            }
    if parts.dense_zero is not None:
        parts.dense_zero.load_state(dense_obj["params"], dense_obj["optim"])
    buffers = dict(model.named_buffers())
    for n, b in dense_obj["buffers"].items():
        if n in buffers:
            buffers[n].copy_(b)
    for idx, layer in enumerate(model.moe_layers()):
        local = placement.local_experts(idx, rank)
        for name, p in zip(EXPERT_PARAM_NAMES, expert_params(layer)):
            rows = [objs[expert_object_name(idx, int(e))] for e in local]
            for e, r in zip(local, rows):
                _check_shape(expert_object_name(idx, int(e)), name, r[name], p[0])
            p.copy_(torch.stack([r[name] for r in rows]))
            if all(f"exp_avg.{name}" in r for r in rows):
                opt.state[p] = {
                    "step": rows[0]["step"].clone(),
                    "exp_avg": torch.stack([r[f"exp_avg.{name}"] for r in rows]).to(p.device),
                    "exp_avg_sq": torch.stack([r[f"exp_avg_sq.{name}"] for r in rows]).to(p.device),
                }
