"""Elastic group size (``cluster.min_workers``): start on what fits, grow from memory at a step
boundary when a node joins, rebuild on fewer ranks when one is lost — and end with the parameters
of the uninterrupted run (the model's result does not depend on the group size), on a real
multi-node Ray (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from cluster.api import run
from cluster.controller import State
from cluster.elastic import choose_size, experts_moved
from moetrain.checkpoint import load_objects, read_manifest, resolve
from moetrain.config import ConfigError, elastic_sizes, from_dict, validate
from placement.placement import Placement
from cluster.group import NAMESPACE, actor_name
from tests.cluster.faults import DieAt, install_hook
from tests.cluster.multinode import MultiNode, killer, pid_of, wait_up

pytestmark = [pytest.mark.ray, pytest.mark.multinode]


def cfg(tmp_path, name: str, **over):
    d = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                  "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_dim": 32}},
        "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
        "train": {"steps": 8, "global_batch_size": 8, "warmup_steps": 2, "eval_every": 0, "log_every": 100},
        "checkpoint": {"uri": str(tmp_path / "ckpt"), "every": 2, "keep": 10},
        "cluster": {"num_workers": 4, "run_name": name, "start_timeout_s": 60, "dashboard": False,
                    "resize_check_s": 0.01, "node_wait_s": 20},
        "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
    }
    for key, value in over.items():
        sect, field = key.split("__")
        d.setdefault(sect, {})[field] = value
    return validate(from_dict(d))


# ---- without Ray -------------------------------------------------------------------------------
def test_min_workers_sizes_and_errors(tmp_path):
    """The sizes an elastic run may take are those the batch and the experts allow; a
    min_workers the run cannot take, or above num_workers, is refused naming the field."""
    assert elastic_sizes(cfg(tmp_path, "a", cluster__min_workers=1)) == [1, 2, 4]  # 8 experts, batch 8: not 3
    assert elastic_sizes(cfg(tmp_path, "a")) == [4]  # 0: a fixed size
    with pytest.raises(ConfigError, match=r"cluster.min_workers \(3\) is not a size this run allows: "
                                          r"train.global_batch_size \(8\)"):
        cfg(tmp_path, "a", cluster__min_workers=3)
    with pytest.raises(ConfigError, match=r"cluster.min_workers \(5\) must be <= cluster.num_workers \(4\)"):
        cfg(tmp_path, "a", cluster__min_workers=5)
    with pytest.raises(ConfigError, match="cluster.resize_check_s"):
        cfg(tmp_path, "a", cluster__resize_check_s=0)
    c = cfg(tmp_path, "a", cluster__min_workers=2)
    assert [choose_size(c, k) for k in (0, 1, 2, 3, 4, 9)] == [None, None, 2, 2, 4, 4]


def test_experts_moved_counts_replicas_new_on_a_rank():
    two, four = Placement.contiguous(2, 8, 2), Placement.contiguous(2, 8, 4)
    # 2 -> 4 contiguous: rank 0 keeps 0,1 of 0-3; rank 1 had 4-7, now 2,3 (new); ranks 2,3 are new.
    assert experts_moved(two, four) == 2 * (2 + 2 + 2)
    assert experts_moved(four, four) == 0
    assert experts_moved(four, two) == 2 * (2 + 4)  # rank 0 gains 2,3; rank 1 (had 2,3) gains 4-7


# ---- on a multi-node Ray -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mn():
    m = MultiNode([2])  # one node with room for 2 ranks; the tests add and remove nodes
    try:
        yield m
    finally:
        m.close()


def _reset(mn) -> None:
    """Back to the module's cluster: one worker node with room for 2 ranks."""
    for node in list(mn.cluster.worker_nodes):
        try:
            mn.cluster.remove_node(node)
        except Exception:  # already gone (killed by the test)
            pass
    mn.add(2)


def final_state(c) -> dict[str, dict]:
    """Every object of the run's last checkpoint (dense state, each expert with its AdamW moments)."""
    ref = resolve("latest", c.checkpoint, run=c.cluster.run_name)
    manifest = read_manifest(ref)
    return load_objects(ref, [n for n in manifest.names if not n.startswith("rng/")], manifest=manifest)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()

    def flat(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from flat(v, f"{path}/{k}")
        elif torch.is_tensor(obj):
            yield path, obj

    for name in a:
        fa, fb = dict(flat(a[name])), dict(flat(b[name]))
        assert fa.keys() == fb.keys(), name
        for k in fa:
            np.testing.assert_allclose(fa[k].float().numpy(), fb[k].float().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}{k}")


@pytest.fixture(scope="module")
def fixed(mn, tmp_path_factory):
    """The uninterrupted run: 2 ranks all along (every group size trains the same model)."""
    tmp = tmp_path_factory.mktemp("fixed")
    c = cfg(tmp, "fixed", cluster__num_workers=2)
    result = run(c)
    return result, final_state(c)


@pytest.mark.parametrize("zero", [0, 1])
def test_starts_on_what_fits_and_grows_from_memory_when_a_node_joins(mn, fixed, tmp_path, zero):
    """num_workers=4, min_workers=2 on a cluster with room for 2: the run starts on 2 ranks; a node
    with room for 2 more joins after step 3; the run starts 2 actors there while it trains and, at
    the first step boundary where they are up, grows to 4 in place from memory (RESIZING: the 2
    ranks keep their processes, no checkpoint read, no step redone) and ends with the fixed run's losses and
    parameters, AdamW moments included — also under ZeRO-1, whose dense optimizer shards are
    gathered for the hand-over and re-sliced over 4."""
    base, base_state = fixed
    joined = []

    def join(m):
        if m.step == 3 and not joined:
            joined.append(mn.add(2))  # seen at the next step boundary: 2 actors start in the background
        if m.step == 4:
            wait_up(c.cluster.run_name, 4)  # ... and join at the boundary after step 4

    c = cfg(tmp_path, f"grow{zero}", cluster__min_workers=2, train__zero_stage=zero)
    try:
        result = run(c, on_step=join)
    finally:
        _reset(mn)
    assert result.state == State.FINISHED and result.restarts == 0, result.error
    assert [h.step for h in result.history] == list(range(1, 9))  # no step redone
    s = result.summary
    assert s["num_workers"] == 4 and s["num_workers_asked"] == 4
    (event,) = s["resizes"]
    assert (event["why"], event["from_ranks"], event["to_ranks"], event["source"]) == ("grow", 2, 4, f"memory://step-{event['step']}")
    assert event["step"] == 4 and event["steps_lost"] == 0 and event["bytes"] > 0
    assert event["experts_moved"] == 2 * 6  # contiguous 2 -> 4 ranks
    assert [len(x) for x in s["layouts"]] == [2, 4]
    np.testing.assert_allclose([h.loss for h in result.history], [h.loss for h in base.history], rtol=1e-5)
    assert_same_state(final_state(c), base_state)


def test_node_lost_rebuilds_on_fewer_ranks_then_grows_back(mn, fixed, tmp_path):
    """4 ranks on two nodes (2+2); the second node is lost at step 3: the run does not wait for it
    but rebuilds on the 2 ranks that fit from the step-2 checkpoint (one step redone, recorded); the
    node comes back at step 5 and the run grows to 4 from memory; the end equals the fixed run."""
    mn.add(2)
    killed: list = []
    back = []
    kill = killer(mn, "shrink", at_step=3, rank=3, killed=killed)

    def on_step(m):
        kill(m)
        if m.step == 5 and killed and not back:
            back.append(mn.add(2))
        elif back and m.step == 6:
            wait_up("shrink", 4)

    c = cfg(tmp_path, "shrink", cluster__min_workers=2, cluster__max_failures=1, cluster__step_timeout_s=20)
    try:
        result = run(c, on_step=on_step)
    finally:
        _reset(mn)
    assert result.state == State.FINISHED and result.restarts == 1 and killed, result.error
    s = result.summary
    lost, grow = s["resizes"]
    assert (lost["why"], lost["from_ranks"], lost["to_ranks"]) == ("node lost", 4, 2)
    assert lost["source"].endswith("/shrink/step-2") and lost["steps_lost"] == 1
    assert (grow["why"], grow["from_ranks"], grow["to_ranks"], grow["steps_lost"]) == ("grow", 2, 4, 0)
    steps = [h.step for h in result.history]
    assert steps[:3] == [1, 2, 3] and steps[3:] == list(range(3, 9)), steps
    np.testing.assert_allclose([h.loss for h in result.history[3:]], [h.loss for h in base_history(fixed)[2:]],
                               rtol=1e-5)
    assert_same_state(final_state(c), fixed[1])


def base_history(fixed):
    return fixed[0].history


def _losses(result) -> dict[int, float]:
    return {h.step: h.loss for h in result.history}


@pytest.mark.parametrize("phase,forward", [("computing", False), ("synced", False), ("reduced", True),
                                           ("applied", True)])
def test_rank_lost_at_each_phase_of_a_step_recovers_from_memory(mn, fixed, tmp_path, caplog, phase, forward):
    """Every expert on both ranks (8 slots each); rank 1 is killed at ``phase`` of step 4. Before
    the gradients are all reduced everywhere the step rolls back (the survivor's weights are the
    step-3 boundary's, the data goes back to where step 4 began); once any rank saw the global norm
    it rolls forward (a survivor without it applies the same update with the norm the other saw).
    The survivor goes on alone in place (same process, a new process group of 1, its state
    reloaded from memory): no checkpoint read (there is none before step 6), no completed step
    redone; a new actor starts in the lost rank's bundle meanwhile and joins at step 6; the run
    ends with the fixed run's parameters."""
    c = cfg(tmp_path, f"die-{phase}", cluster__num_workers=2, cluster__min_workers=1, cluster__max_failures=1,
            cluster__step_timeout_s=30, placement__slots_per_rank=8, checkpoint__every=6)

    pids = {}

    def arm(m):
        if m.step == 1:
            victim = ray.get_actor(actor_name(c.cluster.run_name, 1), namespace=NAMESPACE)
            ray.get(victim.run_fn.remote(install_hook, DieAt(phase, 4)), timeout=60)
        if m.step in (2, 5):  # the survivor keeps its process
            pids[m.step] = ray.get(ray.get_actor(actor_name(c.cluster.run_name, 0)).run_fn.remote(pid_of), timeout=60)
        if m.step == 6:  # a new actor starts in the lost rank's bundle (its node lives) while 1 rank trains
            wait_up(c.cluster.run_name, 2)

    with caplog.at_level("INFO", logger="moetrain"):
        result = run(c, on_step=arm)
    assert result.state == State.FINISHED and result.restarts == 1, result.error
    event, grow = result.summary["resizes"]
    at = 4 if forward else 3
    assert (event["why"], event["source"], event["steps_lost"], event["from_ranks"], event["to_ranks"]) == (
        "node lost", f"memory://step-{at}", 0, 2, 1)
    assert pids[2] == pids[5]
    sizes = [(h.step, h.world_size) for h in result.history]  # each step says how many ranks took it
    assert sizes[:3] == [(1, 2), (2, 2), (3, 2)] and (6, 1) in sizes and sizes[-1] == (8, 2), sizes
    assert (grow["why"], grow["source"], grow["from_ranks"], grow["to_ranks"], grow["step"]) == (
        "grow", "memory://step-6", 1, 2, 6)
    assert f"every survivor is at the end of step {at} (" in caplog.text
    if not forward:
        assert "(the cut step 4 rolled back)" in caplog.text
    steps = [h.step for h in result.history]
    # the step cut short: redone after a roll-back; after a roll-forward it happened (its metrics died with the call)
    assert steps == [1, 2, 3] + ([5, 6, 7, 8] if forward else [4, 5, 6, 7, 8]), steps
    base = _losses(fixed[0])
    np.testing.assert_allclose([h.loss for h in result.history], [base[s] for s in steps], rtol=1e-5)
    assert_same_state(final_state(c), fixed[1])


def test_no_live_replica_falls_back_to_the_checkpoint_and_says_so(mn, fixed, tmp_path, caplog):
    """Contiguous experts (no replicas): the lost rank's experts exist nowhere else, so the run
    says so and resumes from its step-2 checkpoint (one step redone), still ending equal."""
    c = cfg(tmp_path, "orphans", cluster__num_workers=2, cluster__min_workers=1, cluster__max_failures=1,
            cluster__step_timeout_s=30)

    def arm(m):
        if m.step == 1:
            victim = ray.get_actor(actor_name(c.cluster.run_name, 1), namespace=NAMESPACE)
            ray.get(victim.run_fn.remote(install_hook, DieAt("synced", 4)), timeout=60)

    with caplog.at_level("INFO", logger="moetrain"):
        result = run(c, on_step=arm)
    assert result.state == State.FINISHED and result.restarts == 1, result.error
    assert "no recovery from memory (no live replica of 8 expert(s) (layer 0 expert 4" in caplog.text
    (event,) = result.summary["resizes"]
    assert event["source"].endswith("/orphans/step-2") and event["steps_lost"] == 1
    assert event["memory_refused"].startswith("no live replica of 8 expert(s)")
    assert_same_state(final_state(c), fixed[1])


def _arm(run_name: str, rank: int, hook) -> None:
    victim = ray.get_actor(actor_name(run_name, rank), namespace=NAMESPACE)
    ray.get(victim.run_fn.remote(install_hook, hook), timeout=60)


def test_a_second_loss_while_recovering_falls_back_to_the_checkpoint(mn, fixed, tmp_path, caplog):
    """4 ranks, every expert on every rank; rank 3 dies in step 4 and rank 2 while the survivors'
    state is being collected: memory gives up (said in the log) and the run resumes from its step-2
    checkpoint on the ranks that fit, ending equal to the fixed run."""
    mn.add(2)
    c = cfg(tmp_path, "twice", cluster__min_workers=1, cluster__max_failures=2, cluster__step_timeout_s=30,
            placement__slots_per_rank=8)

    def arm(m):
        if m.step == 1:
            _arm(c.cluster.run_name, 3, DieAt("synced", 4))
            _arm(c.cluster.run_name, 2, DieAt("snapshot", 4))

    try:
        with caplog.at_level("INFO", logger="moetrain"):
            result = run(c, on_step=arm)
    finally:
        _reset(mn)
    assert result.state == State.FINISHED, result.error
    assert "no recovery from memory (" in caplog.text
    lost = [e for e in result.summary["resizes"] if e["why"] == "node lost"]
    assert lost and lost[0]["source"].endswith("/twice/step-2") and lost[0]["steps_lost"] == 1, lost
    assert_same_state(final_state(c), fixed[1])


def test_zero_falls_back_to_the_checkpoint_and_says_why(mn, tmp_path, caplog):
    """ZeRO-1 shards the dense AdamW state over the ranks: a lost rank's shard exists nowhere
    else, so even with every expert replicated the run resumes from its checkpoint, and says so."""
    c = cfg(tmp_path, "zero", cluster__num_workers=2, cluster__min_workers=1, cluster__max_failures=1,
            cluster__step_timeout_s=60, placement__slots_per_rank=8, train__zero_stage=1)

    def arm(m):
        if m.step == 1:  # (ZeRO's step has no "synced" phase: DeepSpeed reduces inside its own step)
            _arm(c.cluster.run_name, 1, DieAt("computing", 4))

    with caplog.at_level("INFO", logger="moetrain"):
        result = run(c, on_step=arm)
    assert result.state == State.FINISHED and result.restarts == 1, result.error
    assert "no recovery from memory (train.zero_stage=1 shards the dense optimizer state" in caplog.text
    (event,) = result.summary["resizes"]
    assert event["source"].endswith("/zero/step-2") and event["steps_lost"] == 1
    assert event["memory_refused"].startswith("train.zero_stage=1 shards the dense optimizer state")


def test_min_workers_not_met_after_a_loss_fails_naming_what_is_missing(mn, tmp_path):
    """The only node is lost: nothing can hold min_workers=2 within cluster.node_wait_s, so the
    run ends FAILED (exit 1, not a bad-input 2) naming the bound and the bundles that do not fit."""
    killed: list = []
    c = cfg(tmp_path, "gone", cluster__num_workers=2, cluster__min_workers=1, cluster__max_failures=1,
            cluster__node_wait_s=5, cluster__step_timeout_s=20)
    try:
        result = run(c, on_step=killer(mn, "gone", at_step=3, rank=1, killed=killed), raise_on_failure=False)
    finally:
        _reset(mn)
    assert killed and result.state == State.FAILED and not result.user_error
    assert "cluster.node_wait_s" in result.error and "CPU" in result.error, result.error


def test_node_lost_with_a_copy_of_every_expert_elsewhere_recovers_from_memory(mn, fixed, tmp_path, caplog):
    """4 ranks on two nodes, 4 slots each with placement.fault_domain=node: a copy of every expert
    on each node. The second node (ranks 2 and 3) is lost at step 3: both its ranks are found lost
    (one only when asked where it stands), ranks 0 and 1 hand over their state, the run goes on
    with 2 ranks without reading a checkpoint or redoing a step, grows back to 4 when a node
    returns, and ends equal to the fixed run."""
    mn.add(2)
    killed: list = []
    back: list = []
    kill = killer(mn, "spread", at_step=3, rank=3, killed=killed)

    pids: dict = {}

    def on_step(m):
        if m.step in (2, 4):  # ranks 0 and 1 keep their processes through the recovery
            pids[m.step] = [ray.get(ray.get_actor(actor_name("spread", r)).run_fn.remote(pid_of)) for r in (0, 1)]
        kill(m)
        if m.step == 5 and killed and not back:
            back.append(mn.add(2))
        elif back and m.step == 6:
            wait_up("spread", 4)

    c = cfg(tmp_path, "spread", cluster__min_workers=2, cluster__max_failures=1, cluster__step_timeout_s=20,
            placement__slots_per_rank=4, placement__fault_domain="node", checkpoint__every=8)
    try:
        with caplog.at_level("INFO", logger="moetrain"):
            result = run(c, on_step=on_step)
    finally:
        _reset(mn)
    assert result.state == State.FINISHED and killed, result.error
    assert "0 expert(s) single-homed (fault domain node)" in caplog.text
    lost, grow = result.summary["resizes"]
    assert (lost["why"], lost["from_ranks"], lost["to_ranks"], lost["lost_ranks"]) == ("node lost", 4, 2, [2, 3])
    assert lost["source"] == f"memory://step-{lost['step']}" and lost["steps_lost"] == 0, lost
    assert (grow["why"], grow["to_ranks"]) == ("grow", 4)
    assert pids[2] == pids[4]
    assert [h.step for h in result.history] == sorted(set(h.step for h in result.history))  # nothing redone
    assert_same_state(final_state(c), fixed[1])


@pytest.mark.parametrize("check_s,again", [(1000.0, False), (1e-9, True)])
def test_resize_check_s_spaces_the_looks_for_room(mn, tmp_path, check_s, again):
    """A run of 1 rank (of 4) on a cluster with room for 2 more: the first look at a step boundary
    finds room for 2 in all (3 do not divide the batch); the next look comes only after
    cluster.resize_check_s, so right away it finds nothing with 1000 s and again room with 1e-9 s."""
    from cluster.elastic import Elastic

    e = Elastic(cfg(tmp_path, "look", cluster__min_workers=1, cluster__resize_check_s=check_s))
    e.world = 1
    assert e.grow_due() and e.grow_to == 2
    assert e.grow_due() is again
