"""Capacity dropping is decided per source rank, by hand, on a real 2-process gloo group.

E = 2 experts, top-1, T = 4 tokens per rank, capacity factor 0.75, contiguous placement
(expert 0 on rank 0, expert 1 on rank 1):

    rank 0 routes its tokens to experts [0, 0, 0, 1];  rank 1 to [0, 1, 1, 1]

Per source rank (what ``AllToAllDispatcher`` does): capacity = ceil(0.75 * 4 * 1 / 2) = 2 pairs
per expert *from this rank*, kept in token order:
    rank 0 drops its token 2 (third pair for expert 0); rank 1 drops its token 3 (third for expert 1).
Over the concatenated 8 tokens (one process, ``LocalDispatcher``): capacity = ceil(0.75 * 8 / 2)
= 3 per expert: expert 0 gets r0t0, r0t1, r0t2, r1t0 -> drops r1t0 (global token 4); expert 1
gets r0t3, r1t1, r1t2, r1t3 -> drops r1t3 (global token 7).
So the two rules drop different tokens ({r0t2, r1t3} vs {r1t0, r1t3}), although both drop two.
"""

from __future__ import annotations

import torch

from moetrain.model.moe.dispatcher import LocalDispatcher
from moetrain.model.moe.experts import GroupedExperts
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dispatcher import AllToAllDispatcher
from placement.placement import Placement
from tests.gloo import run_gloo

E, T, D, CF = 2, 4, 4, 0.75
IDS = {0: [0, 0, 0, 1], 1: [0, 1, 1, 1]}


def _inputs(rank: int):
    x_TD = torch.arange(T * D, dtype=torch.float32).view(T, D) / 10 + rank + 1  # no zero rows
    return x_TD, torch.tensor(IDS[rank]).view(T, 1), torch.ones(T, 1)


def _zero_rows(y_TD: torch.Tensor) -> list[int]:
    return torch.nonzero((y_TD == 0).all(dim=1)).flatten().tolist()


def _dispatch_on_rank(ctx: ParallelContext) -> dict:
    placement = Placement.contiguous(1, E, 2)
    experts = GroupedExperts(placement.local_experts(0, ctx.rank), D, 8, seed=0, layer_index=0, init_std=0.5)
    disp = AllToAllDispatcher(placement, 0, ctx, capacity_factor=CF, dedup=True)
    x_TD, ids_TK, w_TK = _inputs(ctx.rank)
    with torch.no_grad():
        x_ND, meta = disp.dispatch(x_TD, ids_TK, w_TK)
        y_TD = disp.combine(experts(x_ND, meta.tokens_per_slot), meta)
    return {"num_dropped": meta.num_dropped, "kept": sorted(meta.unit_token_U.tolist()), "zero_rows": _zero_rows(y_TD)}


def test_expert_parallel_capacity_is_per_source_rank():
    ranks = run_gloo(_dispatch_on_rank, 2)
    assert ranks[0] == {"num_dropped": 1, "kept": [0, 1, 3], "zero_rows": [2]}
    assert ranks[1] == {"num_dropped": 1, "kept": [0, 1, 2], "zero_rows": [3]}


def test_one_process_capacity_over_the_concatenated_tokens_drops_other_tokens():
    experts = GroupedExperts([0, 1], D, 8, seed=0, layer_index=0, init_std=0.5)
    xs, ids, ws = zip(*[_inputs(r) for r in (0, 1)])
    disp = LocalDispatcher([0, 1], E, CF)
    with torch.no_grad():
        x_ND, meta = disp.dispatch(torch.cat(xs), torch.cat(ids), torch.cat(ws))
        y_TD = disp.combine(experts(x_ND, meta.tokens_per_slot), meta)
    assert meta.num_dropped == 2
    assert _zero_rows(y_TD) == [4, 7]  # rank 1's tokens 0 and 3, not rank 0's token 2
