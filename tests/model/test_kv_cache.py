"""The inference key/value cache: incremental decoding gives the logits of the full forward at
every position (plain and grouped-query attention with q/k norm, MoE blocks), the cached causal
mask is the hand-computed one, greedy decoding with the cache picks the same tokens as without
it, and overflowing the cache (or the context, in greedy) is refused."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.hf.generate import greedy
from moetrain.model.attention import KVCache, cached_causal_mask
from moetrain.model.transformer import Transformer

MAX_SEQ = 12


def model(**arch) -> Transformer:
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=MAX_SEQ, **arch,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, first_moe_layer=1))
    m = Transformer(cfg, seed=1)
    with torch.no_grad():  # larger weights than the init: logits that differ from position to position
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    return m.eval()


def test_cached_causal_mask_by_hand():
    # 2 new positions (absolute 3 and 4) over 3 cached: row i sees keys 0 .. 3 + i
    assert cached_causal_mask(2, 3, "cpu").tolist() == [[True, True, True, True, False],
                                                        [True, True, True, True, True]]
    assert cached_causal_mask(1, 7, "cpu") is None and cached_causal_mask(4, 0, "cpu") is None


@pytest.mark.parametrize("arch", [{}, {"n_kv_heads": 2, "qk_norm": True, "qkv_bias": True}])
def test_incremental_logits_equal_the_full_forward(arch):
    m = model(**arch)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = m(tokens)
        caches = m.new_kv_caches()
        parts = [m(tokens[:, :5], caches)[0], m(tokens[:, 5:7], caches)[0]]  # prefill, then a 2-token chunk
        parts += [m(tokens[:, t:t + 1], caches)[0] for t in range(7, 10)]  # then one token at a time
    assert all(c.length == 10 for c in caches)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[:, 3], full[:, 4])  # positions differ: a shifted cache would show


def test_greedy_with_the_cache_picks_the_tokens_of_the_full_recompute():
    m = model(n_kv_heads=2, qk_norm=True)
    prompt = [40, 41, 42, 43]
    cached = greedy(m, prompt, 8)  # 4 + 8 = MAX_SEQ: the whole context
    plain = greedy(m, prompt, 8, kv_cache=False)
    assert cached == plain and len(cached) == 8
    assert len(set(cached)) > 1


def test_greedy_past_the_context_is_refused_not_cut():
    from moetrain.hf import HFError

    with pytest.raises(HFError, match=r"prompt \(5 tokens\) plus --max-new-tokens \(8\) exceeds .*max_seq_len 12"):
        greedy(model(), [3, 14, 15, 9, 2], 8)


def test_overflowing_the_cache_is_refused():
    m = model()
    caches = m.new_kv_caches()
    with torch.no_grad():
        m(torch.zeros(1, MAX_SEQ - 1, dtype=torch.long), caches)
        with pytest.raises(ValueError, match=f"sequence length {MAX_SEQ + 1} exceeds model.max_seq_len"):
            m(torch.zeros(1, 2, dtype=torch.long), caches)
    assert isinstance(caches[0], KVCache) and caches[0].length == MAX_SEQ - 1
