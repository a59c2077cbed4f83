"""moetrain.train.state on its own: a rank's checkpoint objects are made from the parts it is
handed (model, optimizer, cursor, rank) and load back, expert by logical id, into the parts of
a model built for another placement."""

from __future__ import annotations

import numpy as np
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import Transformer
from moetrain.parallel.grads import EXPERT_PARAM_NAMES, expert_params
from moetrain.train.state import DENSE, RankParts, expert_object_name, load_rank_objects, objects_to_read, rank_objects
from placement.placement import Placement

CFG = ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=8,
                  moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8))


def _parts(placement: Placement, seed: int) -> RankParts:
    model = Transformer(CFG, seed=seed, placement=placement)
    return RankParts(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1), dense_zero=None,
                     cursor=None, rank=0)


def _expert_rows(parts: RankParts, placement: Placement) -> dict[tuple[int, int, str], torch.Tensor]:
    """(layer, logical expert, matrix) -> weights, and the same for AdamW's exp_avg."""
    out = {}
    for idx, layer in enumerate(parts.model.moe_layers()):
        for name, p in zip(EXPERT_PARAM_NAMES, expert_params(layer)):
            for slot, e in enumerate(placement.local_experts(idx, 0)):
                out[(idx, int(e), name)] = p.detach()[slot].clone()
                out[(idx, int(e), "exp_avg." + name)] = parts.optimizer.state[p]["exp_avg"][slot].clone()
    return out


def test_objects_of_one_placement_load_into_another_by_logical_expert():
    src_p = Placement.contiguous(2, 4, 1)
    dst_p = Placement(np.array([[3, 1, 0, 2], [2, 0, 3, 1]]), (4,), 4)  # every expert in another slot
    src = _parts(src_p, seed=0)
    loss = src.model(torch.randint(0, 50, (2, 8)))[0].square().mean()
    loss.backward()
    src.optimizer.step()
    objects = rank_objects(src, src_p)
    assert sorted(objects) == sorted([DENSE, "rng/rank-0.pt"] + [expert_object_name(l, e) for l in range(2)
                                                                 for e in range(4)])
    assert objects_to_read(dst_p, 0) == [DENSE] + [expert_object_name(l, e) for l in range(2) for e in range(4)]

    dst = _parts(dst_p, seed=1)  # other dense weights too: everything must come from the objects
    load_rank_objects(dst, dst_p, lambda names: {n: objects[n] for n in names})
    want, got = _expert_rows(src, src_p), _expert_rows(dst, dst_p)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    for (_, a), (_, b) in zip(src.model.dense_parameters(), dst.model.dense_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(dst.optimizer.state[b]["exp_avg_sq"], src.optimizer.state[a]["exp_avg_sq"])
