"""RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (D), weight initialised to 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight_D = nn.Parameter(torch.ones(dim))

    def forward(self, x_D: Tensor) -> Tensor:
        return F.rms_norm(x_D, (x_D.shape[-1],), self.weight_D, self.eps)
