"""Live re-placement: solve a better expert placement off the critical path and migrate to it.

Owns: the driver side of re-placement. Every ``placement.replan_every`` steps the ranks' routing
statistics (a moving window, all-reduced once) go to a Ray task that runs the placement solver
while training continues. When the task is done, at the next step boundary, the predicted gain
(the cost model on the same statistics: current vs proposed placement) is compared with
``placement.min_gain``; if it is enough, every rank exchanges expert weights **and** AdamW state
(``moetrain.parallel.migrate``) and training continues on the new placement. Each decision is
recorded: predicted gain, solve time, bytes moved, and (at the end of the run) the measured
off-rank sends per step before and after.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import ray

from moetrain.config import RunConfig
from placement import Placement, Topology, evaluate, from_topk_ids, solve_placement

log = logging.getLogger("moetrain")


def due(cfg: RunConfig, step: int) -> bool:
    p = cfg.placement
    return p.replan_every > 0 and step % p.replan_every == 0 and step < cfg.train.steps


def _solve(stats, topology: Topology, current: Placement, method: str, time_limit_s: float,
           load_weight: float, migration_weight: float) -> dict:
    """Runs in a Ray task: the proposal and the cost of current vs proposed on the same stats."""
    t0 = time.perf_counter()
    result = solve_placement(stats, topology, method=method, current=current, time_limit_s=time_limit_s,
                             load_weight=load_weight, migration_weight=migration_weight)
    before = evaluate(stats, current, topology)
    after = evaluate(stats, result.placement, topology)
    return {"placement_json": result.placement.to_json(), "solver": result.solver, "status": result.status,
            "bound": result.bound, "solve_time_s": time.perf_counter() - t0,
            "cost_before": before.objective, "cost_after": after.objective,
            "sends_before": before.sends, "sends_after": after.sends,
            "imbalance_before": float(before.imbalance_L.mean()), "imbalance_after": float(after.imbalance_L.mean())}


class Replanner:
    """Holds at most one solve in flight."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._pending = None  # (ObjectRef, launch step)
        self._remote = ray.remote(num_cpus=0)(_solve)  # tiny CPU share: never blocks the actors

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def launch(self, group, placement: Placement, step: int) -> None:
        if self._pending is not None:
            return
        samples = group.call("routing_stats")
        ids_TLK = np.concatenate([s["topk_ids"] for s in samples]).astype(np.int64)
        stats = from_topk_ids(ids_TLK, self.cfg.model.moe.num_experts)
        topo = Topology(num_ranks=placement.num_ranks, slots_per_rank=placement.slots_per_rank)
        p = self.cfg.placement
        method = "ilp" if p.solver == "ilp" else "greedy"
        ref = self._remote.remote(stats, topo, placement, method, p.time_limit_s, p.load_weight, p.migration_weight)
        self._pending = (ref, step)
        log.info("step %d: re-placement solve launched on %d sampled tokens", step, ids_TLK.shape[0])

    def ready(self, block: bool = False) -> bool:
        if self._pending is None:
            return False
        done, _ = ray.wait([self._pending[0]], timeout=None if block else 0)
        return bool(done)

    def finish(self, group, placement: Placement, step: int) -> dict:
        """Decide on the finished proposal and migrate if the predicted gain is enough."""
        ref, launched = self._pending
        self._pending = None
        d = ray.get(ref)
        gain = (d["cost_before"] - d["cost_after"]) / max(d["cost_before"], 1e-12)
        new = Placement.from_json(d["placement_json"])
        decision = {**d, "step": step, "launched_step": launched, "predicted_gain": gain,
                    "migrated": False, "bytes_moved": 0, "migrate_s": 0.0}
        if gain >= self.cfg.placement.min_gain and new != placement:
            moved = group.call("migrate", d["placement_json"])
            decision.update(migrated=True, bytes_moved=int(sum(m["bytes_received"] for m in moved)),
                            migrate_s=max(m["migrate_s"] for m in moved))
        log.info("step %d: re-placement %s (predicted gain %.1f%%, sends/token %.3f -> %.3f, solve %.1f s%s)",
                 step, "MIGRATED" if decision["migrated"] else "kept current", 100 * gain, d["sends_before"],
                 d["sends_after"], d["solve_time_s"],
                 f", {decision['bytes_moved'] / 2**20:.1f} MB moved" if decision["migrated"] else "")
        return decision


def measured_gains(decisions: list[dict], history: list[dict], window: int = 10) -> None:
    """Fill each migration's measured off-rank sends per step, ``window`` steps before/after."""
    sends = {h["step"]: h["offrank_sends"] for h in history}
    for d in decisions:
        s = d["step"]
        before = [sends[i] for i in range(s - window + 1, s + 1) if i in sends]
        after = [sends[i] for i in range(s + 1, s + window + 1) if i in sends]
        d["measured_sends_before"] = float(np.mean(before)) if before else float("nan")
        d["measured_sends_after"] = float(np.mean(after)) if after else float("nan")
