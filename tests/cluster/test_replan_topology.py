"""The re-planner sees the cluster's topology (ranks per node, inter-node cost) and, by default,
each sampled token's home rank; no Ray needed."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.replacement import _solve, honour_fault_domains, log_single_homed, run_topology, solve_now
from moetrain.config import ConfigError, from_dict, validate
from placement import Placement, from_topk_ids
from placement.domains import single_homed


def _cfg(**cluster):
    return validate(from_dict({"model": {"moe": {"num_experts": 4, "top_k": 2}},
                               "cluster": {"num_workers": 4, **cluster},
                               "placement": {"inter_node_cost": 3.0}}))


def test_run_topology_has_the_clusters_nodes_and_costs():
    cfg = _cfg(ranks_per_node=2)
    topo = run_topology(cfg, Placement.contiguous(2, 4, 4))
    assert topo.num_ranks == 4 and topo.ranks_per_node == 2 and topo.num_nodes == 2
    assert topo.link_cost_RR[0].tolist() == [0.0, 1.0, 3.0, 3.0]
    assert run_topology(_cfg(), Placement.contiguous(2, 4, 4)).num_nodes == 1


def test_ranks_per_node_must_divide_the_workers():
    with pytest.raises(ConfigError, match=r"cluster.ranks_per_node \(3\) must divide cluster.num_workers \(4\)"):
        _cfg(ranks_per_node=3)


def test_proposal_scores_sends_from_home_ranks_on_the_cluster_topology():
    # 2 ranks on 2 nodes; home 0 uses experts {0, 2}, home 1 uses {1, 3}: contiguous {0,1}|{2,3}
    # makes every token send once (cost 3 across nodes); {0,2}|{1,3} sends nothing.
    ids = np.array([[0, 2]] * 4 + [[1, 3]] * 4)[:, None, :]
    stats = from_topk_ids(ids, 4, home_T=np.array([0] * 4 + [1] * 4))
    cfg = validate(from_dict({"model": {"moe": {"num_experts": 4, "top_k": 2}},
                              "cluster": {"num_workers": 2, "ranks_per_node": 1},
                              "placement": {"inter_node_cost": 3.0}}))
    cur = Placement.contiguous(1, 4, 2)
    prop = _solve(stats, run_topology(cfg, cur), cur, "ilp", 2.0, 1.0, 0.0, 0)
    assert prop.sends_before == pytest.approx(1.0) and prop.sends_after == pytest.approx(0.0)
    assert sorted(prop.placement.local_experts(0, 0).tolist()) == [0, 2]  # home 0's experts on rank 0


def test_fault_domain_defaults_to_none_and_changes_the_chosen_placement(caplog):
    """placement.fault_domain reaches the solver: top-1 loads 40/30/20/10 on 4 ranks in 2 nodes
    with 2 slots each; "none" (EPLB's counts 3/2/2/1) leaves experts on one node, "node" puts
    every expert on both, and the run's log names the single-homed experts."""
    assert _cfg().placement.fault_domain == "none"
    stats = from_topk_ids(np.repeat(np.arange(4), [40, 30, 20, 10])[:, None, None], 4)
    cur = Placement.contiguous(1, 4, 4, 2)
    chosen, cfgs = {}, {}
    for fd in ("none", "node"):
        cfgs[fd] = validate(from_dict({"model": {"moe": {"num_experts": 4, "top_k": 2}},
                                       "cluster": {"num_workers": 4, "ranks_per_node": 2},
                                       "placement": {"slots_per_rank": 2, "method": "greedy", "val_fraction": 0.0,
                                                     "fault_domain": fd}}))
        chosen[fd] = solve_now(stats, run_topology(cfgs[fd], cur), cur, cfgs[fd]).placement
    nodes = np.array([0, 0, 1, 1])
    assert chosen["none"] != chosen["node"]
    assert single_homed(chosen["none"], nodes) == ((1, 2, 3),)
    assert single_homed(chosen["node"], nodes) == ((),)
    with caplog.at_level("INFO", logger="moetrain"):
        log_single_homed(cfgs["node"], chosen["none"], (0, 0, 1, 1), "test")
        log_single_homed(cfgs["none"], chosen["none"], (0, 0, 1, 1), "silent")
    assert "test: 3 expert(s) single-homed (fault domain node): layer 0: [1, 2, 3]" in caplog.text
    assert "silent" not in caplog.text
    prop = _solve(stats, run_topology(cfgs["node"], cur), cur, "greedy", 2.0, 1.0, 0.0, 0, 0.0, "node")
    assert prop.placement == chosen["node"]


def test_a_start_placement_is_repaired_for_its_fault_domains(caplog):
    """A round-robin start with two copies of each of 8 experts on 4 ranks (2 per node) leaves
    experts 0 and 4 (rank 0 + 1: node 0) and 2, 6 (ranks 2 + 3: node 1) on one node; with
    placement.fault_domain=node the group starts on a repaired placement (every expert on both
    nodes, every rank still 4 slots, every expert twice), with "none" on the round-robin one."""
    rr = Placement.round_robin(1, 8, 4, 4)
    nodes = (0, 0, 1, 1)
    assert single_homed(rr, np.array(nodes)) == ((0, 2, 4, 6),)
    cfgs = {fd: validate(from_dict({"model": {"moe": {"num_experts": 8, "top_k": 2}},
                                    "cluster": {"num_workers": 4},
                                    "placement": {"slots_per_rank": 4, "fault_domain": fd}})) for fd in ("none", "node")}
    assert honour_fault_domains(cfgs["none"], rr, nodes, "start") is rr
    with caplog.at_level("INFO", logger="moetrain"):
        fixed = honour_fault_domains(cfgs["node"], rr, nodes, "start")
    assert single_homed(fixed, np.array(nodes)) == ((),)
    assert fixed.slots_per_rank == (4, 4, 4, 4) and np.bincount(fixed.phy2log_LS[0], minlength=8).tolist() == [2] * 8
    assert "start: repaired for placement.fault_domain=node" in caplog.text
    assert "start: 0 expert(s) single-homed (fault domain node): none" in caplog.text
    assert honour_fault_domains(cfgs["node"], fixed, nodes, "again") is fixed  # valid: left alone
