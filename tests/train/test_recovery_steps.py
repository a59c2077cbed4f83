"""The rank's side of a recovery from memory: where a cut step stands (``step_status``), where it
began (``boundary_cursor``) and finishing it with another rank's norm (``roll_forward``), in one
process; and the driver's decision (``cluster.recovery.decide`` / ``sources``) on hand-made states."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.recovery import Decision, NotRecoverable, decide, describe, sources
from moetrain.config import load_config
from moetrain.train.trainer import RankTrainer
from placement.placement import Placement

SMALL = ["model.dim=32", "model.n_heads=2", "model.ffn_dim=64", "model.moe.expert_ffn_dim=32", "data.seq_len=32",
         "model.max_seq_len=32", "train.global_batch_size=4", "train.steps=4", "data.max_bytes_per_domain=150000",
         "cluster.num_workers=1"]


class Cut(Exception):
    pass


def _cut_at(phase: str):
    def hook(p: str, completed: int) -> None:
        if p == phase:
            raise Cut(p)
    return hook


def test_roll_forward_applies_the_update_the_full_step_applies():
    cfg = load_config("tiny", SMALL)
    a, b = RankTrainer(cfg), RankTrainer(cfg)
    a.train_step()
    b.train_step()
    assert b.step_status() == {"step": 1, "phase": "idle", "norm": a.last_norm}
    b.fault_hook = _cut_at("synced")
    with pytest.raises(Cut):
        b.train_step()  # step 2 cut after its gradients, before the norm
    assert b.step_status()["phase"] == "synced" and b.step == 1
    assert b.boundary_cursor() == a.cursor.state_dict() != b.cursor.state_dict()  # where step 2 began
    a.train_step()
    b.fault_hook = None
    b.roll_forward(a.last_norm)
    assert b.step_status() == {"step": 2, "phase": "idle", "norm": a.last_norm}
    ta, tb = a.export_tensors(), b.export_tensors()
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)  # bit for bit
    with pytest.raises(RuntimeError, match="cannot roll step 3 forward from phase idle"):
        b.roll_forward(a.last_norm)
    assert b.train_step().loss == a.train_step().loss  # and the runs go on alike


def test_a_step_cut_before_its_gradients_are_whole_cannot_roll_forward():
    b = RankTrainer(load_config("tiny", SMALL))
    b.fault_hook = _cut_at("computing")
    with pytest.raises(Cut):
        b.train_step()
    assert b.step_status()["phase"] == "computing"
    with pytest.raises(RuntimeError, match="cannot roll step 1 forward from phase computing"):
        b.roll_forward(1.0)


def _st(step: int, phase: str, norm: float = float("nan")) -> dict:
    return {"step": step, "phase": phase, "norm": norm}


def test_decide_rolls_forward_once_anyone_applied_else_back():
    # rank 2 applied step 5 (norm 0.7): ranks 0, 1 hold its gradients and apply it with that norm
    d = decide({0: _st(4, "synced"), 1: _st(4, "synced"), 2: _st(5, "idle", 0.7)})
    assert d == Decision(5, True, 0.7, (0, 1), (0, 1, 2)) and describe(d) == "step 5 rolled forward on ranks [0, 1]"
    # nobody past the norm: the step did not happen anywhere
    d = decide({0: _st(4, "computing"), 1: _st(4, "synced")})
    assert d == Decision(4, False, d.norm, (), (0, 1)) and describe(d) == "the cut step 5 rolled back"
    # every survivor finished the step the lost rank died in
    assert describe(decide({0: _st(5, "idle", 0.3), 1: _st(5, "idle", 0.3)})) == "step 5 completed on every survivor"
    with pytest.raises(NotRecoverable, match=r"ranks \[2\] applied step 5 but ranks \[0\] lack its gradients"):
        decide({0: _st(4, "computing"), 2: _st(5, "idle", 0.7)})
    with pytest.raises(NotRecoverable, match="more than one step apart"):
        decide({0: _st(3, "idle"), 1: _st(5, "idle")})


def test_sources_take_each_expert_from_a_live_replica():
    # 4 experts, 2 ranks x 3 slots: rank 0 holds 0,1,2; rank 1 holds 2,3,0 (replicas of 0 and 2)
    p = Placement(np.array([[0, 1, 2, 2, 3, 0]]), (3, 3), 4)
    with pytest.raises(NotRecoverable, match=r"no live replica of 1 expert\(s\) \(layer 0 expert 1\)"):
        sources(p, [1])
    both = sources(p, [0, 1])
    assert both[0] == ["dense.pt", "experts/layer-0/expert-0.pt", "experts/layer-0/expert-1.pt",
                       "experts/layer-0/expert-2.pt"]
    assert both[1] == ["experts/layer-0/expert-3.pt"]
