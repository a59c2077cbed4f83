"""RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (D), weight initialised to 1.

A low-precision input (a bf16 projection under autocast, e.g. OLMoE's q/k norm) is normalised in
fp32 and cast back, as Hugging Face's RMSNorm does; fp32 inputs take the fused kernel unchanged."""

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
        if x_D.dtype != self.weight_D.dtype:
            return F.rms_norm(x_D.float(), (x_D.shape[-1],), self.weight_D, self.eps).to(x_D.dtype)
        return F.rms_norm(x_D, (x_D.shape[-1],), self.weight_D, self.eps)
