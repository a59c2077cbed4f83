"""The dispatch metadata says what was sent: ``SentRows`` (local / same node / other nodes) from
the splits the dispatcher already read, on a routing counted by hand.

2 ranks, 4 experts contiguous (expert e on rank e // 2), K = 2, and both ranks route the same 3
tokens: t0 -> (2, 3) (both on rank 1), t1 -> (0, 2) (ranks 0, 1), t2 -> (2, 1) (ranks 1, 0).
Units per destination rank:
- dedup, dropless: t0 -> r1; t1 -> r0, r1; t2 -> r1, r0: [2, 3];
- dedup, capacity 1 pair per expert (cf = 2/3: ceil(2/3 * 3 * 2 / 4) = 1): t1's and t2's pairs to
  expert 2 (t0 came first) are dropped; both still go to r0: [2, 1];
- no dedup, dropless: one unit per pair: r0 gets (t1, 0), (t2, 1); r1 the other four: [2, 4].
Seen from rank r, "local" is entry r; the other entry is "inter" when the ranks are on two nodes
(node map (0, 1)) and "intra" on one node ((0, 0)).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.model.moe.dispatcher import SentRows
from tests.gloo import run_gloo

IDS = [[2, 3], [0, 2], [2, 1]]
CF = 2 / 3
UNITS = {"flat": [2, 3], "flat_chunked": [2, 3], "flat_capacity": [2, 1], "flat_no_dedup": [2, 4],
         "hierarchical": [2, 3],  # the routing's flat-dedup demand, whatever the stages carried
         "hierarchical_capacity": [2, 1]}


def _expected(name: str, nodes: str, rank: int) -> SentRows:
    units = UNITS[name]
    other = units[1 - rank]
    return SentRows(units[rank], other, 0) if nodes == "one" else SentRows(units[rank], 0, other)


def _sent(ctx):
    from moetrain.model.moe.experts import GroupedExperts
    from moetrain.parallel.dispatcher import AllToAllDispatcher
    from moetrain.parallel.hierarchical import HierarchicalDispatcher
    from placement.placement import Placement

    placement = Placement.contiguous(1, 4, 2)
    experts = GroupedExperts(placement.local_experts(0, ctx.rank), 4, 8, seed=1, layer_index=0, init_std=0.1)
    cases = {"flat": (AllToAllDispatcher, {}), "flat_chunked": (AllToAllDispatcher, {"chunks": 2}),
             "flat_capacity": (AllToAllDispatcher, {"capacity_factor": CF}),
             "flat_no_dedup": (AllToAllDispatcher, {"dedup": False}),
             "hierarchical": (HierarchicalDispatcher, {}),
             "hierarchical_capacity": (HierarchicalDispatcher, {"capacity_factor": CF})}
    out = {}
    for (name, (cls, kw)), nodes in [(case, n) for case in cases.items() for n in ("one", "two")]:
        if cls is HierarchicalDispatcher and nodes == "one":
            continue  # the trainer uses flat dispatch on one node
        c = dataclasses.replace(ctx, node_R=(0, 0) if nodes == "one" else (0, 1))
        disp = cls(placement, 0, c, **kw)
        x = torch.randn(3, 4)
        w = torch.full((3, 2), 0.5)
        if hasattr(disp, "run"):
            _, meta = disp.run(x, torch.tensor(IDS), w, experts)
        else:
            x_ND, meta = disp.dispatch(x, torch.tensor(IDS), w)
            disp.combine(experts(x_ND, meta.tokens_per_slot), meta)
        out[(name, nodes)] = meta.sent_rows()
    return out


@pytest.mark.slow
def test_dispatch_metadata_reports_the_rows_sent_by_link():
    for rank, got in enumerate(run_gloo(_sent, 2)):
        assert len(got) == 10
        for (name, nodes), sent in got.items():
            want = _expected(name, nodes, rank)
            assert sent == want, f"rank {rank} {name} on {nodes} node(s): {sent} != {want}"
            assert sent.offrank == UNITS[name][1 - rank]


def test_sent_rows_from_splits_by_hand():
    # rank 1 of nodes (0, 0, 1): 5 rows kept, 2 to rank 0 (same node), 7 to rank 2 (other node)
    s = SentRows.from_splits([2, 5, 7], 1, [0, 0, 1])
    assert (s.local, s.intra, s.inter, s.offrank) == (5, 2, 7, 9)
    assert SentRows.from_splits([3], 0, [0]) == SentRows(3, 0, 0)
