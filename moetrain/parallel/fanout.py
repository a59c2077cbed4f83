"""The receiving side's row bookkeeping as two autograd Functions with lean backwards.

Owns: ``fan_out_rows`` (received units [V, D + K] -> expert rows [N, D] and their routing
weights [N]) and ``weighted_unit_sums`` (expert results [N, D] -> weighted sum per received
unit [V, D]). They compute exactly what the indexing expressions did
(``recv[:, :D].index_select(0, unit)``, ``recv[unit, D + k]``,
``zeros(V, D).index_add(0, unit, y * w[:, None])``); the backwards avoid what autograd builds
for those: fan-out wrote two zero-filled [V, D + K] gradients (one per output, via a zeroed
[V, D] and a slice-scatter) and added them, now one buffer takes both; the unit sums
materialised ``grad * y`` [N, D] for the weight gradient and a fresh ``grad * w``, now the
weight gradient is a row dot product and the row gradient is scaled in place.

Shapes: V received units, D model dim, K top-k, N expert rows (unit, k) grouped by slot.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recv_VX, pair_unit_N, k_N, D: int):
        flat_N = pair_unit_N * recv_VX.shape[1] + (D + k_N)
        ctx.save_for_backward(pair_unit_N, flat_N)
        ctx.shape, ctx.D = recv_VX.shape, D
        return recv_VX[:, :D].index_select(0, pair_unit_N), recv_VX.reshape(-1).take(flat_N)

    @staticmethod
    def backward(ctx, gx_ND, gw_N):
        pair_unit_N, flat_N = ctx.saved_tensors
        like = gx_ND if gx_ND is not None else gw_N
        g_VX = like.new_zeros(ctx.shape)
        if gx_ND is not None:
            g_VX[:, : ctx.D].index_add_(0, pair_unit_N, gx_ND)
        if gw_N is not None:
            g_VX.view(-1).index_add_(0, flat_N, gw_N.to(g_VX.dtype))
        return g_VX, None, None, None


def fan_out_rows(recv_VX: Tensor, pair_unit_N: Tensor, k_N: Tensor, D: int) -> tuple[Tensor, Tensor]:
    """(x_ND, weight_N): row ``recv_VX[pair_unit_N[n], :D]`` and weight ``recv_VX[pair_unit_N[n],
    D + k_N[n]]`` of every expert row n."""
    return _FanOut.apply(recv_VX.contiguous(), pair_unit_N, k_N, D)


class _WeightedUnitSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, weight_N, pair_unit_N, num_units: int):
        w_N1 = weight_N.to(y_ND.dtype).unsqueeze(1)
        ctx.save_for_backward(y_ND, w_N1, pair_unit_N)
        ctx.w_dtype = weight_N.dtype
        return y_ND.new_zeros((num_units, y_ND.shape[1])).index_add_(0, pair_unit_N, y_ND * w_N1)

    @staticmethod
    def backward(ctx, g_VD):
        y_ND, w_N1, pair_unit_N = ctx.saved_tensors
        g_ND = g_VD.index_select(0, pair_unit_N)
        gw_N = torch.linalg.vecdot(g_ND, y_ND).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return g_ND.mul_(w_N1), gw_N, None, None


def weighted_unit_sums(y_ND: Tensor, weight_N: Tensor, pair_unit_N: Tensor, num_units: int) -> Tensor:
    """y_VD[v] = sum of ``weight_N[n] * y_ND[n]`` over the rows n with ``pair_unit_N[n] == v``."""
    return _WeightedUnitSums.apply(y_ND, weight_N, pair_unit_N, num_units)
