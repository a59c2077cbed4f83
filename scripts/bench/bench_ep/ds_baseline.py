"""The DeepSpeed baseline: ``deepspeed.moe.layer.MoE`` built with a moetrain layer's gate and
SwiGLU expert weights, the adapter that puts it inside a moetrain ``Block``, and the one clear
error when DeepSpeed is not installed (it is the ``bench`` extra, not a runtime dependency).
The only module of the benchmark that imports deepspeed."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from .common import MIN_CAPACITY

MISSING_MSG = ("bench_ep: deepspeed is not installed (the DeepSpeed baseline); "
               "pip install -e .[bench]  (or run with --no-deepspeed)")


def require_deepspeed() -> str:
    """The installed deepspeed version; exits with status 2 and one line naming the extra when
    deepspeed cannot be imported."""
    try:
        import deepspeed
    except ImportError:
        print(MISSING_MSG, file=sys.stderr)
        raise SystemExit(2) from None
    return deepspeed.__version__


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"  # + "<rank>_<MASTER_ADDR>_<MASTER_PORT>_<i>"


def release_deepspeed_shm(port: int) -> list[str]:
    """Unlink the shared-memory buffers DeepSpeed's CPU comm backend made for the group on
    ``port``. ``deepspeed.init_distributed`` creates two 64 MiB ``/dev/shm`` buffers for the group
    and never unlinks them, so without this every benchmark run leaks 128 MiB of RAM per world size
    until reboot (4.4 GB had piled up here after a day of runs). Call once the ranks have exited. Returns the names removed."""
    if not os.path.isdir(SHM_DIR):
        return []
    gone = [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX) and f"_{port}_" in n[len(SHM_PREFIX):]]
    for name in gone:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    return gone


def init_deepspeed_comm() -> float:
    """``deepspeed.init_distributed`` on the process group already set up; returns its seconds
    (the first call on a machine compiles a shared-memory comm op)."""
    import deepspeed
    import deepspeed.comm  # noqa: F401
    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    return time.perf_counter() - t0


def ds_moe(args, ws: int, drop_tokens: bool, moe_layer, capacity_factor: float | None = None):
    """A DeepSpeed MoE with the moetrain layer's gate and (SwiGLU) expert weights. DeepSpeed's
    noisy gate, random token selection and 2nd-expert sampling are off, so it routes as moetrain."""
    from deepspeed.moe.layer import MoE
    from moetrain.model.ffn import SwiGLU
    cf = args.capacity_factor if capacity_factor is None else capacity_factor
    ds = MoE(args.dim, expert=SwiGLU(args.dim, args.ffn), num_experts=args.experts, ep_size=ws,
             k=args.top_k, capacity_factor=cf, eval_capacity_factor=cf,
             min_capacity=MIN_CAPACITY, noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False,
             top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(moe_layer.router.gate_ED)
        ex = moe_layer.experts
        for j, e in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            e.w_gate_FD.copy_(ex.w_gate_SFD[j])
            e.w_up_FD.copy_(ex.w_up_SFD[j])
            e.w_down_DF.copy_(ex.w_down_SDF[j])
    return ds


class DSMixedPrecision(nn.Module):
    """DeepSpeed's MoE under moetrain's precision policy, so a bf16 comparison is like for like.

    In the autocast region the benchmark puts around every forward (moetrain's and DeepSpeed's
    alike): the MoE input is cast to the compute dtype (``moetrain.precision.to_compute``, what
    moetrain's dispatcher does at entry, so both systems' all-to-all payloads travel in bf16),
    the gate runs with autocast disabled (DeepSpeed calls ``input.float()`` and an fp32 linear;
    without this, autocast would run that linear in bf16, while moetrain's router is fp32), the
    expert linears run in bf16 under the autocast, and the output is cast back to the input's
    dtype (as ``MoELayer`` does). Outside autocast (fp32) it changes nothing."""

    def __init__(self, ds_moe):
        super().__init__()
        from moetrain.precision import fp32_compute
        self.ds = ds_moe
        gate = ds_moe.deepspeed_moe.gate
        gate.forward = fp32_compute(gate.forward)

    def forward(self, x, *rest):
        from moetrain.precision import to_compute
        y, *aux = self.ds(to_compute(x), *rest)
        return (y.to(x.dtype), *aux)


def ds_variant(args, ws: int, capacity_factor: float, moe_layer, device):
    """DeepSpeed's counterpart of a moetrain variant: capacity factor 0 (moetrain dropless) ->
    ``drop_tokens=False`` (every expert padded to the largest count), else the same factor;
    wrapped in :class:`DSMixedPrecision`."""
    c = capacity_factor
    return DSMixedPrecision(ds_moe(args, ws, c > 0, moe_layer, capacity_factor=c if c > 0 else 1.0)).to(device)


def make_adapter_cls():
    from moetrain.model.moe.layer import MoELayer
    from moetrain.model.moe.router import RouterOutput

    class DSMoEAdapter(MoELayer):
        """Drop-in for a moetrain MoELayer inside ``Block``: DeepSpeed MoE on [B, T, D], returns
        (y, RouterOutput) with empty routing tensors (the benchmark loss is LM only)."""

        def __init__(self, ds_moe):
            nn.Module.__init__(self)
            self.ds = ds_moe
            self.dispatcher = None

        def forward(self, x_BTD):
            y, _l_aux, _counts = self.ds(x_BTD)
            empty = x_BTD.new_zeros(0)
            return y, RouterOutput(empty, empty, empty.long(), empty)

    return DSMoEAdapter
