"""Node-limited routing (``model.moe.max_nodes_per_token``, DeepSeek-V3): hand-computed choices of
:func:`node_limited`, the router applying it on its expert -> node map, and its refusals."""

import pytest
import torch

from moetrain.config import ConfigError, MoEConfig, from_dict
from moetrain.model.moe.router import TopKRouter, node_limited
from moetrain.parallel.hierarchical import expert_nodes
from placement.placement import Placement

NODE_E = torch.tensor([0, 0, 1, 1, 2, 2])  # 6 experts, 2 per node
SCORES = torch.tensor([[0.30, 0.05, 0.20, 0.20, 0.25, 0.00],
                       [0.10, 0.10, 0.05, 0.40, 0.15, 0.20]])


def chosen(select_TE, k):
    return [sorted(r) for r in select_TE.topk(k, dim=-1).indices.tolist()]


def test_one_node_of_two_best_scores_beats_the_single_best_expert():
    """K = 2, M = 1: a node's score is the sum of its ceil(2/1) = 2 best. Row 0: node 0 0.35,
    node 1 0.40, node 2 0.25 -> node 1 (experts 2, 3), although expert 0 scores highest.
    Row 1: 0.20, 0.45, 0.35 -> node 1 (experts 3, 2)."""
    limited = node_limited(SCORES, NODE_E, num_nodes=3, max_nodes=1, top_k=2)
    assert chosen(limited, 2) == [[2, 3], [2, 3]]
    assert chosen(SCORES, 2) == [[0, 4], [3, 5]]  # unlimited
    assert torch.isinf(limited[0, [0, 1, 4, 5]]).all() and torch.equal(limited[0, 2:4], SCORES[0, 2:4])


def test_two_nodes_by_their_best_expert():
    """K = 2, M = 2: ceil(2/2) = 1 best per node. Row 0: 0.30, 0.20, 0.25 -> nodes 0, 2 ->
    experts 0, 4. Row 1: 0.10, 0.40, 0.20 -> nodes 1, 2 -> experts 3, 5."""
    limited = node_limited(SCORES, NODE_E, num_nodes=3, max_nodes=2, top_k=2)
    assert chosen(limited, 2) == [[0, 4], [3, 5]]
    assert torch.isinf(limited[1, :2]).all()


def test_uneven_nodes_and_an_empty_node():
    """Node 0 holds expert 0 only, node 1 experts 1-4, node 3 none (never chosen). K = 2, M = 1:
    node 0 = 0.5 (its one expert), node 1 = 0.3 + 0.25 = 0.55 -> node 1."""
    node_E = torch.tensor([0, 1, 1, 1, 1])
    scores = torch.tensor([[0.5, 0.3, 0.25, 0.1, 0.05]])
    limited = node_limited(scores, node_E, num_nodes=4, max_nodes=1, top_k=2)
    assert chosen(limited, 2) == [[1, 2]]
    assert node_limited(scores, node_E, num_nodes=2, max_nodes=2, top_k=2) is scores  # M >= nodes: off


def test_router_keeps_every_token_on_at_most_m_nodes_and_weights_from_unmasked_scores():
    router = TopKRouter(8, MoEConfig(num_experts=6, top_k=4, max_nodes_per_token=2))
    torch.nn.init.normal_(router.gate_ED, std=1.0)
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    free = router(x)
    router.set_expert_nodes(NODE_E)
    out = router(x)
    nodes_T = [len(set(NODE_E[row].tolist())) for row in out.topk_ids_TK]
    assert max(nodes_T) <= 2
    assert max(len(set(NODE_E[row].tolist())) for row in free.topk_ids_TK) == 3, "the limit must bind somewhere"
    w = out.scores_TE.gather(1, out.topk_ids_TK)
    torch.testing.assert_close(out.topk_weights_TK, w / w.sum(-1, keepdim=True))


def test_expert_nodes_follow_the_primary_replica_and_the_node_map():
    p = Placement.contiguous(1, 8, 4)  # experts 2r, 2r+1 on rank r
    assert expert_nodes(p, 0, (0, 0, 1, 1)).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert expert_nodes(p, 0, (0, 1, 1, 1)).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert expert_nodes(p, 0, ()).tolist() == [0] * 8


def test_refusals_name_the_field():
    router = TopKRouter(8, MoEConfig(num_experts=6, top_k=4, max_nodes_per_token=1))
    with pytest.raises(ValueError, match=r"max_nodes_per_token \(1\).*hold 2 < top_k \(4\)"):
        router.set_expert_nodes(NODE_E)
    with pytest.raises(ConfigError, match=r"max_nodes_per_token \(1\) and model.moe.num_groups \(2\)"):
        from_dict({"model": {"moe": {"num_experts": 8, "top_k": 2, "num_groups": 2, "max_nodes_per_token": 1}}})
    with pytest.raises(ConfigError, match=r"model.moe.max_nodes_per_token \(-1\) must be in"):
        from_dict({"model": {"moe": {"max_nodes_per_token": -1}}})
    with pytest.raises(ConfigError, match="model.moe.dispatch .'mesh'. must be one of flat, hierarchical"):
        from_dict({"model": {"moe": {"dispatch": "mesh"}}})
    with pytest.raises(ConfigError, match="needs model.moe.dedup=true"):
        from_dict({"model": {"moe": {"dispatch": "hierarchical", "dedup": False}}})
    with pytest.raises(ConfigError, match=r"a2a_chunks \(2\) must be 1 with model.moe.dispatch=hierarchical"):
        from_dict({"model": {"moe": {"dispatch": "hierarchical", "a2a_chunks": 2}}})
