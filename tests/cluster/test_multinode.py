"""The run on several Ray nodes (``ray.cluster_utils.Cluster``: real raylets, one address): the
gang's ranks contiguous per node for every strategy and for uneven nodes, the topology the solver
receives equal to where the ranks landed, threads from the rank's bundle, a group that cannot be
placed refused in one line, and a node removed mid-run recovered on the nodes left (or a loud
failure when they cannot hold the group). One cluster for the module; the tests that remove
nodes run last."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from cluster.api import run
from cluster.cli import main as cli_main
from cluster.controller import State
from cluster.gang import Gang
from cluster.worker import MoERank, interface_for_ip
from moetrain.config import from_dict, validate
from tests.cluster.multinode import MultiNode, killer, num_threads

pytestmark = [pytest.mark.ray, pytest.mark.multinode]


@pytest.fixture(scope="module")
def mn(s3_server):  # the S3 server first: its credentials are in the environment the nodes inherit
    m = MultiNode([2, 2])  # nodes A and B: 2 CPUs each
    try:
        yield m
    finally:
        m.close()


def cfg(tmp_path, name: str, **over):
    d = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 4, "global_batch_size": 8, "warmup_steps": 2, "eval_every": 0, "log_every": 100},
        "cluster": {"num_workers": 4, "run_name": name, "start_timeout_s": 60, "dashboard": False},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
    }
    for key, value in over.items():
        sect, field = key.split("__")
        d.setdefault(sect, {})[field] = value
    return validate(from_dict(d))


@ray.remote(num_cpus=0)
def _where() -> str:
    return ray.get_runtime_context().get_node_id()


@pytest.mark.parametrize("strategy,workers,per_node", [
    ("PACK", 4, [2, 2]), ("SPREAD", 4, [2, 2]), ("SPREAD", 3, [2, 1]), ("PACK", 3, [2, 1]),
    ("STRICT_SPREAD", 2, [1, 1])])
def test_ranks_contiguous_per_node_where_the_actors_landed(mn, tmp_path, strategy, workers, per_node):
    c = cfg(tmp_path, f"gang-{strategy}-{workers}", cluster__num_workers=workers,
            cluster__placement_strategy=strategy, model__moe={"num_experts": 12, "top_k": 2, "expert_ffn_dim": 32},
            train__global_batch_size=12)
    gang = Gang.reserve(c, 30, "test")
    try:
        lay = gang.layout
        assert sorted(lay.node_of_rank) == list(lay.node_of_rank)  # contiguous, nodes 0..N-1 in rank order
        assert sorted(lay.node_of_rank.count(n) for n in range(lay.num_nodes)) == sorted(per_node)
        landed = ray.get([_where.options(**gang.actor_options(r)).remote() for r in range(workers)])
        assert landed == [lay.node_ids[n] for n in lay.node_of_rank]  # the map is where ranks really run
    finally:
        gang.remove()


def test_threads_follow_the_rank_bundle(mn, tmp_path):
    # cluster.torch_threads=0: the bundle's 2 CPUs (the override: tests/cluster/test_worker_binding.py)
    c = cfg(tmp_path, "threads", cluster__num_workers=2, cluster__cpus_per_worker=2)
    gang = Gang.reserve(c, 30, "test")
    try:
        actors = [ray.remote(MoERank).options(num_cpus=2, **gang.actor_options(r)).remote(c.to_dict(), r, 2)
                  for r in range(2)]
        assert ray.get([a.run_fn.remote(num_threads) for a in actors], timeout=120) == [2, 2]
        assert gang.layout.node_of_rank == (0, 1)
        for a in actors:
            ray.kill(a)
    finally:
        gang.remove()


def test_ranks_per_node_mismatch_is_one_line_exit_2(mn, tmp_path, capsys):
    args = ["train", "--config", "tiny", "--set", "cluster.num_workers=4", "--set", "cluster.ranks_per_node=4",
            "--set", "cluster.run_name=rpn", "--set", "cluster.dashboard=false", "--set", "train.steps=2",
            "--set", f"logging.out_dir={tmp_path}", "--set", "logging.wandb=disabled"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moetrain: error: cluster.ranks_per_node (4) does not match the cluster: the 4 ranks landed "
                   "2+2 on 2 node(s) (cluster.placement_strategy=PACK); set cluster.ranks_per_node=0 to use the "
                   "real layout"]


def test_unplaceable_group_fails_in_the_start_timeout_naming_bundles(mn, tmp_path, capsys):
    t0 = time.monotonic()
    args = ["train", "--config", "tiny", "--set", "cluster.num_workers=3", "--set", "cluster.placement_strategy=STRICT_PACK",
            "--set", "cluster.start_timeout_s=3", "--set", "cluster.run_name=nofit", "--set", "cluster.dashboard=false",
            "--set", "model.moe.num_experts=6", "--set", "train.global_batch_size=6", "--set", "train.steps=2",
            "--set", f"logging.out_dir={tmp_path}", "--set", "logging.wandb=disabled"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("moetrain: error: cannot place the worker group within 3 s (cluster.start_timeout_s): "
                             "bundle(s) 2 of 3 ({CPU: 1} each, STRICT_PACK) do not fit; the Ray cluster has 3 node(s): ")
    assert err[0].count("2/2 CPU") == 2 and "0/0 CPU" in err[0]  # both nodes free, the head has none
    assert time.monotonic() - t0 < 60
    assert not ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())  # no group left behind


# ---- node loss (these remove nodes: keep them last) ------------------------------------------------


@pytest.mark.slow
def test_node_lost_mid_run_recovers_on_the_nodes_left(mn, tmp_path, s3_server):
    # 2 ranks spread over A and B (1+1), both writing checkpoints to one S3 server; B is removed at
    # step 5: the group is rebuilt on A (2 ranks, one node), the placement re-solved for that
    # layout, and the run resumes from step 4.
    uri = s3_server.uri("multinode")
    c = cfg(tmp_path, "nodeloss", train__steps=7, cluster__num_workers=2, cluster__placement_strategy="SPREAD",
            checkpoint__uri=uri, storage__s3_endpoint=s3_server.endpoint, checkpoint__every=2, checkpoint__keep=10,
            cluster__max_failures=2, cluster__step_timeout_s=20, cluster__node_wait_s=20,
            placement__replan_every=2, placement__blocking=True, placement__min_gain=1.0, placement__time_limit_s=1.0)
    killed: list = []
    result = run(c, on_step=killer(mn, "nodeloss", at_step=5, rank=1, killed=killed), raise_on_failure=False)
    assert result.state == State.FINISHED, result.error
    assert killed and result.restarts == 1
    s = result.summary
    # The loss falls during step 5 or during the step-4 upload that overlaps it (S3): then that
    # checkpoint fails, is never committed, and the run resumes from step 2 instead of step 4.
    lost_upload = [f["step"] for f in s["checkpoint_failures"]]
    assert lost_upload in ([], [4]), s["checkpoint_failures"]
    resumed = 2 if lost_upload else 4
    assert [h.step for h in result.history] == [1, 2, 3, 4, 5] + list(range(resumed + 1, 8))
    assert s["layouts"] == [[0, 1], [0, 0]] and s["node_of_rank"] == [0, 0]
    ranks = s["ranks"]
    assert killed[0] not in {r["node_id"] for r in ranks} and ranks[0]["node_id"] == ranks[1]["node_id"]
    # the solver received the real layout before and after the loss; the placement was re-solved for the new one
    after = [step for step in (4, 6) if step > resumed]  # re-plans after the rebuild
    assert [d.proposal.node_of_rank for d in result.replacements] == [(0, 1), (0, 1)] + [(0, 0)] * len(after)
    assert s["placements_resolved_for_topology"] == 1
    # gloo bound to the interface holding the Ray node's address (every node here shares this machine's)
    assert all(r["ifname"] and r["ifname"] == interface_for_ip(r["node_ip"]) for r in ranks), ranks
    assert all(r["threads"] == 1 for r in ranks)  # cpus_per_worker=1
    assert [ck.rsplit("step-", 1)[-1] for ck in result.checkpoints] == ["2", "4", "6", "7"]  # a lost step 4 redone
    for ck in result.checkpoints:  # every committed checkpoint is whole (sizes and checksums)
        assert cli_main(["ckpt", "verify", ck, "--s3-endpoint", s3_server.endpoint]) == 0, ck
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix="multinode/nodeloss/step-")["Contents"]]
    steps = {k.split("/")[2] for k in keys}
    assert steps == {k.split("/")[2] for k in keys if k.endswith("/manifest.json")}  # nothing uncommitted left
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())  # both groups gone


@pytest.mark.slow
def test_node_lost_while_starting_is_retried_then_fails_loudly_when_the_rest_cannot_hold_it(mn, tmp_path):
    mn.add(1)  # left after the test above: A (2 CPUs); now C (1): the group spreads over A and C
    c = cfg(tmp_path, "lost-at-start", train__steps=4, cluster__num_workers=2, cluster__placement_strategy="SPREAD",
            cluster__max_failures=1, cluster__step_timeout_s=20, cluster__node_wait_s=6)
    killed: list = []
    thread = threading.Thread(target=lambda: killed.append(mn.kill_node_of_when_up("lost-at-start", 0, 120)))
    thread.start()
    result = run(c, raise_on_failure=False)
    thread.join()
    assert killed[0] and result.history == []  # A went away while the group was starting
    assert result.restarts == 1  # ... which was retried (max_failures=1), not an immediate failure
    assert result.state == State.FAILED and not result.user_error  # exit 1, not 2: the loss came first
    assert result.error.startswith("cannot place the worker group within 6 s (cluster.node_wait_s): bundle(s) 1 of 2 "
                                   "({CPU: 1} each, SPREAD) do not fit; the Ray cluster has 2 node(s): "), result.error
    assert "\n" not in result.error and "1/1 CPU" in result.error
