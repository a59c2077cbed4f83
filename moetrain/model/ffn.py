"""Dense SwiGLU feed-forward network (non-MoE blocks and always-on shared experts).

Owns: ``y = (silu(x W_gate^T) * (x W_up^T)) W_down^T``. Weights are created as zeros (no RNG); the
owning model initialises them from its dense generator (see ``Transformer``).

Shapes: D model dim, F hidden dim, leading dims are free (``x_*D``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate_FD = nn.Parameter(torch.zeros(hidden_dim, dim))
        self.w_up_FD = nn.Parameter(torch.zeros(hidden_dim, dim))
        self.w_down_DF = nn.Parameter(torch.zeros(dim, hidden_dim))

    def forward(self, x_D: Tensor) -> Tensor:
        return F.linear(F.silu(F.linear(x_D, self.w_gate_FD)) * F.linear(x_D, self.w_up_FD), self.w_down_DF)
