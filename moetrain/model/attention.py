"""Causal multi-head self-attention with rotary position embeddings (RoPE).

Owns: the fused QKV and output projections, the rotary tables (non-persistent buffers computed
from ``rope_theta``) and the call to ``F.scaled_dot_product_attention(is_causal=True)``.

Shapes: B batch, T sequence, D model dim, H heads, d = D / H head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary_tables(max_seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos_TH2, sin_TH2: [max_seq_len, d / 2] float32, angle t * theta^(-2i / head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64).unsqueeze(1) * inv_freq.unsqueeze(0)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHTd: Tensor, cos_Th: Tensor, sin_Th: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) by the position's angle (half-split layout)."""
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    cos, sin = cos_Th.to(x_BHTd.dtype), sin_Th.to(x_BHTd.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, max_seq_len: int, rope_theta: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.max_seq_len = max_seq_len
        self.wqkv_QD = nn.Parameter(torch.zeros(3 * dim, dim))  # Q = 3D: q, k, v stacked
        self.wo_DD = nn.Parameter(torch.zeros(dim, dim))
        cos, sin = rotary_tables(max_seq_len, self.head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({self.max_seq_len})")
        qkv_BT3Hd = F.linear(x_BTD, self.wqkv_QD).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTd, k_BHTd, v_BHTd = qkv_BT3Hd.permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        q_BHTd, k_BHTd = apply_rotary(q_BHTd, cos, sin), apply_rotary(k_BHTd, cos, sin)
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, is_causal=True)
        return F.linear(y_BHTd.transpose(1, 2).reshape(B, T, D), self.wo_DD)
