"""In-place resizes (cluster/inplace.py, recovery.keep): which survivors go on, the names joiners
take, DeepSpeed re-bound to a new process group, and no actor left behind by a failing callback.
The resizes themselves (a loss recovered in the survivors' processes, a growth joined at a step
boundary, both ending with the uninterrupted run's parameters) are tests/cluster/test_elastic.py."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import ray

from cluster.api import run
from cluster.group import NAMESPACE
from cluster.inplace import _free_names
from cluster.recovery import NotRecoverable, keep
from moetrain.config import from_dict, validate


def cfg(tmp_path, name: str, workers: int = 4, min_workers: int = 2):
    return validate(from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 4, "global_batch_size": 8, "warmup_steps": 1, "eval_every": 0},
        "cluster": {"num_workers": workers, "min_workers": min_workers, "run_name": name, "dashboard": False},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
    }))


def test_keep_goes_on_with_whole_nodes_and_refuses_too_few(tmp_path):
    """Sizes 2 and 4 allowed (8 experts, batch 8; 3 is not): of 3 survivors on nodes (0,0,1,1),
    the node with both its ranks stays; 1 survivor is fewer than any allowed size."""
    c = cfg(tmp_path, "k")
    nodes = (0, 0, 1, 1)
    assert keep(c, [0, 1, 3], nodes) == [0, 1]
    assert keep(c, [0, 2, 3], nodes) == [2, 3]  # node 1 is whole, node 0 lost rank 1
    assert keep(c, [0, 1, 2, 3], nodes) == [0, 1, 2, 3]
    assert keep(c, [1, 2], nodes) == [1, 2]  # one from each node: both go on
    with pytest.raises(NotRecoverable, match="1 rank"):
        keep(c, [2], nodes)


def test_joiners_take_the_first_names_no_member_holds():
    names = _free_names("r", {"moetrain/r/rank-0", "moetrain/r/rank-2"})
    assert [next(names) for _ in range(3)] == ["moetrain/r/rank-1", "moetrain/r/rank-3", "moetrain/r/rank-4"]


ZERO_TWICE = """
import sys, torch, torch.distributed as dist
from moetrain.train.zero import DenseZero, forget_process_groups
def build():
    lin = torch.nn.Linear(4, 4)
    DenseZero(list(lin.named_parameters()), stage=1, lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.0,
              grad_clip=1.0, world_size=1)
build()
dist.destroy_process_group()  # what a rank does when it leaves a broken group
if sys.argv[1] == "forget":
    forget_process_groups()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
try:
    build()
    print("bound")
except Exception as exc:
    print("refused:", str(exc)[:200])
"""


@pytest.mark.parametrize("forget", [True, False])
def test_zero_binds_to_a_new_process_group_once_deepspeed_forgets_the_old(forget):
    """DeepSpeed caches the process group it first saw: a rank that re-forms its group (an in-place
    resize) and builds ZeRO again is refused unless ``forget_process_groups`` ran (the test shows
    both, so it fails if DeepSpeed stops caching or the reset stops working)."""
    pytest.importorskip("deepspeed")
    p = subprocess.run([sys.executable, "-c", ZERO_TWICE, "forget" if forget else "keep"],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-2000:]
    if forget:
        assert out == "bound", out
    else:
        assert out.startswith("refused:") and "not registered" in out, out


def test_a_callback_that_raises_leaves_no_actor_or_placement_group(tmp_path, ray_local):
    """An ``on_step`` that raises ends the run with its exception, and the run's actors and its
    placement group are gone (a leak would hold the cluster's CPUs for every later run)."""
    c = cfg(tmp_path, "boom", workers=2, min_workers=0)

    def boom(m):
        raise KeyError("callback bug")

    with pytest.raises(KeyError, match="callback bug"):
        run(c, on_step=boom)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True) if n["namespace"] == NAMESPACE]
        pgs = [p for p in ray.util.placement_group_table().values()
               if p.get("name") == "moetrain/boom" and p.get("state") != "REMOVED"]
        if not [n for n in names if n.startswith("moetrain/boom/")] and not pgs:
            break
        time.sleep(0.2)
    assert not [n for n in names if n.startswith("moetrain/boom/")], names
    assert not pgs, pgs


@pytest.mark.parametrize("stopped", [True, False])
def test_a_silent_rank_is_taken_as_lost_a_slow_one_is_not(tmp_path, ray_local, stopped):
    """Rank 0's call fails while rank 1's is still running. With ``keep_survivors`` rank 1 is
    pinged: stopped (SIGSTOP: a node gone before Ray's health check says so) it does not answer
    within PING_S and is lost, rank 0 survives; merely slow (its spare thread answers) it lives,
    so this is no loss and the whole group ends as before."""
    import os
    import signal

    from cluster.group import PING_S, WorkerGroup, WorkerGroupError
    from cluster.worker import MoERank
    from tests.cluster.faults import fail_in, pid_of

    c = cfg(tmp_path, "ping", workers=2, min_workers=0)
    actors = [ray.remote(MoERank).options(max_concurrency=3).remote(c.to_dict(), r, 2) for r in range(2)]
    pids = ray.get([a.run_fn.remote(pid_of) for a in actors])
    group = WorkerGroup(actors, c)
    if stopped:
        os.kill(pids[1], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerGroupError) as err:
            group.call("run_fn", fail_in, pids[0], 10.0, keep_survivors=True)
        assert time.monotonic() - t0 < 5  # neither waits for the slow call nor for a health check
    finally:
        if stopped:
            os.kill(pids[1], signal.SIGCONT)
        WorkerGroup._kill(actors)
    e = err.value
    if stopped:
        assert e.lost and e.survivors == [0] and f"no answer within {PING_S:g} s" in str(e), str(e)
    else:
        assert not e.lost and e.survivors is None and "ValueError: boom" in str(e), str(e)


def test_nodes_where_every_rank_was_lost_are_kept_out_of_growths_for_a_while(tmp_path):
    """A node whose ranks were all lost may be dead before Ray says so: growths leave it alone for
    a while (a node where a rank goes on lost a process, not itself)."""
    from cluster.elastic import Elastic
    from cluster.recovery import gone_nodes

    info = [{"rank": 0, "node_id": "a"}, {"rank": 1, "node_id": "a"}, {"rank": 2, "node_id": "b"},
            {"rank": 3, "node_id": "b"}]
    assert gone_nodes(info, (0, 1), [0, 1]) == {"b"}
    assert gone_nodes(info, (0, 1, 2), [0, 1, 2]) == set()  # rank 2 goes on: b lost a process, not itself
    assert gone_nodes(info, (0, 1, 2), [0, 1]) == {"b"}  # rank 2 answered from a dying node, then dropped
    assert gone_nodes(info, (2, 3), [2, 3]) == {"a"}
    e = Elastic(cfg(tmp_path, "sus"))
    e.suspect({"b"}, for_s=1000)
    e.suspect({"c"}, for_s=-1)  # expired at once
    assert e.suspects == {"b"}
