"""Causal self-attention with rotary position embeddings (RoPE), optionally grouped-query.

Owns: the fused QKV and output projections (optional QKV bias, Qwen2), the optional q/k RMSNorm
over the whole query / key projection before the heads are split (OLMoE's convention), the
rotary tables (non-persistent buffers computed from ``rope_theta``; half-split pairs
``(x[i], x[i + d/2])``, the ``rotate_half`` convention of HF Llama / Mixtral / Qwen2 / OLMoE)
and the call to ``F.scaled_dot_product_attention(is_causal=True)`` (KV heads repeated for GQA);
for inference, an optional :class:`KVCache` that keeps the rotated keys and the values of the
positions already seen, so that a decoding step computes only its new positions.

Shapes: B batch, T sequence, D model dim, H query heads, G key/value heads, d head dim (D / H),
Q = (H + 2G) * d fused projection rows (q, then k, then v), P positions already in a cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.model.norm import RMSNorm


@functools.lru_cache(maxsize=8)
def rotary_tables(max_seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos_TH2, sin_TH2: [max_seq_len, d / 2] float32, angle t * theta^(-2i / head_dim).

    Cached: every layer of a model shares one pair (never written in place), so a long context
    (Mixtral's 32768 positions: 16 MB per pair at head dim 128) is held once, not per layer."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64).unsqueeze(1) * inv_freq.unsqueeze(0)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHTd: Tensor, cos_Th: Tensor, sin_Th: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) by the position's angle (half-split layout)."""
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    cos, sin = cos_Th.to(x_BHTd.dtype), sin_Th.to(x_BHTd.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@dataclass
class KVCache:
    """One attention layer's keys (rotated) and values of the positions seen so far: inference
    only (no autograd), batch and position order as fed. Grows by concatenation."""

    k_BGPd: Tensor | None = None
    v_BGPd: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BGPd is None else self.k_BGPd.shape[2]

    def extend(self, k_BGTd: Tensor, v_BGTd: Tensor) -> tuple[Tensor, Tensor]:
        """Append this call's keys / values; returns every position's (cached + new)."""
        if self.k_BGPd is not None and self.v_BGPd is not None:
            k_BGTd, v_BGTd = torch.cat([self.k_BGPd, k_BGTd], dim=2), torch.cat([self.v_BGPd, v_BGTd], dim=2)
        self.k_BGPd, self.v_BGPd = k_BGTd, v_BGTd
        return k_BGTd, v_BGTd


def cached_causal_mask(T: int, P: int, device) -> Tensor | None:
    """Boolean [T, P + T] mask: new position i (absolute P + i) sees keys 0..P + i. None when no
    mask is needed (P == 0 uses ``is_causal``; a single new position sees every key)."""
    if P == 0 or T == 1:
        return None
    return torch.arange(P + T, device=device).unsqueeze(0) <= (torch.arange(T, device=device) + P).unsqueeze(1)


class CausalSelfAttention(nn.Module):
    rope_cos: Tensor  # buffers, registered in __init__
    rope_sin: Tensor

    def __init__(
        self,
        dim: int,
        n_heads: int,
        max_seq_len: int,
        rope_theta: float,
        *,
        n_kv_heads: int = 0,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.max_seq_len = max_seq_len
        q_rows, kv_rows = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split_sizes = (q_rows, kv_rows, kv_rows)
        self.wqkv_QD = nn.Parameter(torch.zeros(q_rows + 2 * kv_rows, dim))  # q, k, v stacked
        self.bqkv_Q = nn.Parameter(torch.zeros(q_rows + 2 * kv_rows)) if qkv_bias else None
        self.q_norm = RMSNorm(q_rows, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(kv_rows, norm_eps) if qk_norm else None
        self.wo_DD = nn.Parameter(torch.zeros(dim, q_rows))
        cos, sin = rotary_tables(max_seq_len, self.head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BTD: Tensor, cache: KVCache | None = None) -> Tensor:
        """``cache``: the positions already seen (their keys and values are reused, this call's are
        appended); x_BTD then holds only the new positions, P.. P + T - 1."""
        B, T, D = x_BTD.shape
        P = cache.length if cache is not None else 0
        if P + T > self.max_seq_len:
            raise ValueError(f"sequence length {P + T} exceeds model.max_seq_len ({self.max_seq_len})")
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv_BTQ = F.linear(x_BTD, self.wqkv_QD, self.bqkv_Q)
        if G == H and self.q_norm is None:  # the original fused path (bit-identical default)
            qkv_BT3Hd = qkv_BTQ.view(B, T, 3, H, d)
            q_BHTd, k_BGTd, v_BGTd = qkv_BT3Hd.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q_BTX, k_BTY, v_BTY = qkv_BTQ.split(self.split_sizes, dim=-1)
            if self.q_norm is not None and self.k_norm is not None:
                q_BTX, k_BTY = self.q_norm(q_BTX), self.k_norm(k_BTY)
            q_BHTd = q_BTX.view(B, T, H, d).transpose(1, 2)
            k_BGTd = k_BTY.view(B, T, G, d).transpose(1, 2)
            v_BGTd = v_BTY.view(B, T, G, d).transpose(1, 2)
        cos, sin = self.rope_cos[P : P + T], self.rope_sin[P : P + T]
        q_BHTd, k_BGTd = apply_rotary(q_BHTd, cos, sin), apply_rotary(k_BGTd, cos, sin)
        if cache is not None:
            k_BGTd, v_BGTd = cache.extend(k_BGTd, v_BGTd)  # now every position: P + T keys
        if G != H:
            k_BGTd = k_BGTd.repeat_interleave(H // G, dim=1)
            v_BGTd = v_BGTd.repeat_interleave(H // G, dim=1)
        mask = cached_causal_mask(T, P, x_BTD.device)
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, attn_mask=mask, is_causal=P == 0 and T > 1)
        return F.linear(y_BHTd.transpose(1, 2).reshape(B, T, H * d), self.wo_DD)
