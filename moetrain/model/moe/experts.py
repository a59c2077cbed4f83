"""Routed SwiGLU experts of one MoE layer, held in local slots.

Owns: the expert weights on this rank and their placement-independent initialisation. Slot j
holds logical expert ``local_experts[j]``; two slots may hold the same expert (replicas), which
are initialised identically. Every expert's weights come from its own generator seeded from
(seed, layer_index, expert_id), so any rank builds bit-identical copies of the experts it holds.

Shapes: S local slots, D model dim, F expert hidden dim, N token rows grouped by slot.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.precision import compute_dtype

GROUPED_MM_MIN_CAPABILITY = (9, 0)  # sm90: where torch._grouped_mm has bf16 kernels
GROUPED_MM_ALIGN_BYTES = 16  # torch._grouped_mm: row strides must be multiples of 16 bytes
# bf16 on CPU: oneDNN builds, JIT-compiles and caches (up to 1024 entries, each with its own
# buffers) one matmul primitive per distinct row count. Expert row counts change every step, so
# without bucketing a rank's resident set grows by hundreds of MB until the cache is full, and
# every new count pays a kernel build. Measured (one thread, [M, 384] x [384, 384] bf16 fwd+bwd, M
# uniform in [100, 900), 2,400 GEMMs): resident set +570 MB and 1.17-1.39 s per 200 GEMMs
# unpadded; +8 MB and 0.97 s padded to multiples of 64 (the padded rows are zeros).
BF16_CPU_ROW_BUCKET = 64


def expert_seed(seed: int, layer_index: int, expert_id: int) -> int:
    """A 63-bit generator seed for one logical expert, stable across processes and versions."""
    digest = hashlib.sha256(f"moetrain-expert/{seed}/{layer_index}/{expert_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def init_expert_weights(
    dim: int, ffn_dim: int, *, seed: int, layer_index: int, expert_id: int, init_std: float, out_std: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(w_gate_FD, w_up_FD, w_down_DF) of one expert, from its own generator (no global RNG)."""
    gen = torch.Generator().manual_seed(expert_seed(seed, layer_index, expert_id))
    w_gate_FD = torch.randn(ffn_dim, dim, generator=gen).mul_(init_std)
    w_up_FD = torch.randn(ffn_dim, dim, generator=gen).mul_(init_std)
    w_down_DF = torch.randn(dim, ffn_dim, generator=gen).mul_(out_std)
    return w_gate_FD, w_up_FD, w_down_DF


def _stack(ws: list[Tensor], shape: tuple[int, int]) -> Tensor:
    return torch.stack(ws) if ws else torch.zeros(0, *shape)


class GroupedExperts(nn.Module):
    """SwiGLU experts ``y = (silu(x W_gate^T) * (x W_up^T)) W_down^T`` in S local slots.

    Parameters ``w_gate_SFD``, ``w_up_SFD`` [S, F, D] and ``w_down_SDF`` [S, D, F].
    A slot that receives no tokens in a step gets a zero gradient slice (the whole parameter's
    ``.grad`` is None only if no slot received any token).

    Compute: one SwiGLU per non-empty slot on its contiguous row block (no per-token loops).
    Measured on the 2-core CPU (S=8, D=F=128, N=4096, fwd+bwd, min of 60): this loop 11.4 ms,
    indexing ``w[slot]`` 12.7 ms, zero-padded ``bmm`` 12.8 ms (exact, but pads to the largest
    slot); ``torch._grouped_mm`` is exact in forward but 2.6x slower and its CPU backward fails.
    So the loop runs on CPU, and on CUDA (bf16, sm90+) one grouped GEMM per weight does.

    bf16: under a bf16 autocast the three stacked weights are cast once per forward and the
    GEMMs run in bf16 (fp32 master weights; their gradients come back in fp32). On CPU each
    slot's rows are padded to a multiple of ``BF16_CPU_ROW_BUCKET`` (see there).
    """

    def __init__(
        self,
        local_experts: Sequence[int],
        dim: int,
        ffn_dim: int,
        *,
        seed: int,
        layer_index: int,
        init_std: float,
        out_std: float | None = None,
    ) -> None:
        super().__init__()
        self.local_experts = tuple(int(e) for e in local_experts)
        self.layer_index = layer_index
        self.dim, self.ffn_dim = dim, ffn_dim
        out_std = init_std if out_std is None else out_std
        per_slot = [
            init_expert_weights(
                dim, ffn_dim, seed=seed, layer_index=layer_index, expert_id=e, init_std=init_std, out_std=out_std
            )
            for e in self.local_experts
        ]
        self.w_gate_SFD = nn.Parameter(_stack([w[0] for w in per_slot], (ffn_dim, dim)))
        self.w_up_SFD = nn.Parameter(_stack([w[1] for w in per_slot], (ffn_dim, dim)))
        self.w_down_SDF = nn.Parameter(_stack([w[2] for w in per_slot], (dim, ffn_dim)))
        self.allow_grouped_mm = True  # False forces the slot loop on CUDA too (measurements)

    @property
    def num_slots(self) -> int:
        return len(self.local_experts)

    def forward(self, x_ND: Tensor, tokens_per_slot: list[int]) -> Tensor:
        """x_ND: rows grouped by slot in slot order (``tokens_per_slot[j]`` rows for slot j,
        summing to N). Returns y_ND in the same row order, in the compute dtype (bf16 under a
        bf16 autocast, else x's dtype). No collective runs in here, so activation checkpointing
        may recompute it (``moetrain.model.checkpointing``)."""
        if len(tokens_per_slot) != self.num_slots:
            raise ValueError(f"tokens_per_slot has {len(tokens_per_slot)} entries for {self.num_slots} slots")
        if sum(tokens_per_slot) != x_ND.shape[0]:
            raise ValueError(f"tokens_per_slot sums to {sum(tokens_per_slot)} but x_ND has {x_ND.shape[0]} rows")
        if x_ND.shape[0] == 0:  # nothing routed here
            return x_ND.new_zeros(0, self.dim)
        # Under bf16 autocast, cast each stacked weight once (one copy, one grad cast in
        # backward) instead of once per slot inside every F.linear.
        dtype = compute_dtype(x_ND.device.type) or x_ND.dtype
        x_ND = x_ND.to(dtype)
        w_gate_SFD, w_up_SFD, w_down_SDF = (w.to(dtype) for w in (self.w_gate_SFD, self.w_up_SFD, self.w_down_SDF))
        if self.allow_grouped_mm and use_grouped_mm(x_ND, self.ffn_dim):
            return grouped_swiglu(x_ND, tokens_per_slot, w_gate_SFD, w_up_SFD, w_down_SDF)
        if x_ND.dtype == torch.bfloat16 and x_ND.device.type == "cpu":
            return bucketed(looped_swiglu, BF16_CPU_ROW_BUCKET, x_ND, tokens_per_slot, w_gate_SFD, w_up_SFD, w_down_SDF)
        return looped_swiglu(x_ND, tokens_per_slot, w_gate_SFD, w_up_SFD, w_down_SDF)


def padded_rows(tokens_per_slot: list[int], bucket: int) -> tuple[list[int], Tensor]:
    """(rows per slot rounded up to a multiple of ``bucket``, int64 [N] position of each real
    row in that padded layout): slot j's rows start where its padded block starts."""
    padded = [-(-n // bucket) * bucket for n in tokens_per_slot]
    counts = torch.tensor(tokens_per_slot, dtype=torch.int64)
    shift_S = torch.tensor(padded, dtype=torch.int64).cumsum(0) - counts.cumsum(0)  # padding before slot j+1
    shift_S = torch.cat([shift_S.new_zeros(1), shift_S[:-1]])
    return padded, torch.arange(int(counts.sum())) + torch.repeat_interleave(shift_S, counts)


def bucketed(swiglu, bucket: int, x_ND: Tensor, tokens_per_slot: list[int], *weights: Tensor) -> Tensor:
    """``swiglu`` on each slot's rows padded with zero rows to a multiple of ``bucket`` (so the
    GEMMs see few distinct shapes), returning the real rows only. Zero rows give zero outputs
    and add nothing to any gradient, so the result is the unpadded one up to summation order."""
    padded, pos_N = padded_rows(tokens_per_slot, bucket)
    pos_N = pos_N.to(x_ND.device)
    x_PD = x_ND.new_zeros(sum(padded), x_ND.shape[1]).index_copy(0, pos_N, x_ND)
    return swiglu(x_PD, padded, *weights).index_select(0, pos_N)


def looped_swiglu(
    x_ND: Tensor, tokens_per_slot: list[int], w_gate_SFD: Tensor, w_up_SFD: Tensor, w_down_SDF: Tensor
) -> Tensor:
    """One SwiGLU per non-empty slot on its contiguous row block; y_ND in row order."""
    # unbind (not w[slot]) so backward stacks the slot grads once instead of S zero-filled adds
    w_gate_FD, w_up_FD, w_down_DF = w_gate_SFD.unbind(0), w_up_SFD.unbind(0), w_down_SDF.unbind(0)
    outs: list[Tensor] = []
    for slot, x_nD in enumerate(x_ND.split(tokens_per_slot)):
        if x_nD.shape[0] == 0:
            continue
        h_nF = F.silu(F.linear(x_nD, w_gate_FD[slot])) * F.linear(x_nD, w_up_FD[slot])
        outs.append(F.linear(h_nF, w_down_DF[slot]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def group_end_offsets(tokens_per_slot: list[int], device: torch.device | str = "cpu") -> Tensor:
    """int32 [S] cumulative row ends of the slot groups (``offs`` of ``torch._grouped_mm``):
    group j is rows [offs[j-1], offs[j]); an empty slot repeats the previous end."""
    ends, total = [], 0
    for n in tokens_per_slot:
        if n < 0:
            raise ValueError(f"tokens_per_slot has a negative count ({n})")
        total += n
        ends.append(total)
    return torch.tensor(ends, dtype=torch.int32, device=device)


def grouped_swiglu(
    x_ND: Tensor, tokens_per_slot: list[int], w_gate_SFD: Tensor, w_up_SFD: Tensor, w_down_SDF: Tensor
) -> Tensor:
    """The same SwiGLU as :func:`looped_swiglu` as three grouped GEMMs over all slots
    (``torch._grouped_mm``, 2D x 3D with row offsets). The offsets come from the host-side
    split sizes: no device synchronisation. Differentiable on CUDA; forward-only on CPU."""
    offs_S = group_end_offsets(tokens_per_slot, x_ND.device)
    gate_NF = torch._grouped_mm(x_ND, w_gate_SFD.transpose(-2, -1), offs=offs_S)
    up_NF = torch._grouped_mm(x_ND, w_up_SFD.transpose(-2, -1), offs=offs_S)
    return torch._grouped_mm(F.silu(gate_NF) * up_NF, w_down_SDF.transpose(-2, -1), offs=offs_S)


def grouped_mm_aligned(dim: int, ffn_dim: int, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` needs every row stride to be a multiple of 16 bytes."""
    size = torch.empty(0, dtype=dtype).element_size()
    return (dim * size) % GROUPED_MM_ALIGN_BYTES == 0 and (ffn_dim * size) % GROUPED_MM_ALIGN_BYTES == 0


def use_grouped_mm(x_ND: Tensor, ffn_dim: int) -> bool:
    """Grouped GEMM for bf16 rows on a CUDA GPU of compute capability >= 9.0 (sm90, where
    ``torch._grouped_mm`` has kernels) when this torch has it and the widths are aligned; the
    slot loop everywhere else (CPU: its backward is unsupported there and its forward is slower
    than the loop)."""
    if not (x_ND.is_cuda and x_ND.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if not grouped_mm_aligned(x_ND.shape[1], ffn_dim, x_ND.dtype):
        return False
    return torch.cuda.get_device_capability(x_ND.device) >= GROUPED_MM_MIN_CAPABILITY
