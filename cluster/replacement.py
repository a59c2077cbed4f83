"""Live re-placement: solve a better expert placement off the critical path and migrate to it.

Owns: the driver side of re-placement. Every ``placement.replan_every`` steps the ranks' routing
statistics — the trainer's moving window of ``placement.window`` steps (counts all-reduced once)
and up to ``placement.sample_tokens`` per-token top-k ids from that window — go to a Ray task that
runs the placement solver while training continues. When the task is done, at the next step
boundary, the predicted gain (the cost model on the same statistics: current vs proposed
placement) is compared with ``placement.min_gain``; if it is enough, every rank exchanges the
moving experts' weights **and** AdamW state point to point (``moetrain.parallel.migrate``) and
training continues on the new placement. The solver scores sends from each sampled token's home
rank (``placement.home_ranks``) on the cluster's topology (``cluster.ranks_per_node``,
:func:`run_topology`). Each decision is a :class:`Decision`: predicted gain,
what the solver saw, solve time, the bytes really sent, and (at the end of the run) the measured
off-rank sends per step before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import ray

from moetrain.config import RunConfig
from moetrain.train.metrics import StepMetrics
from moetrain.train.stats import merge_rank_samples
from placement import Placement, RoutingStats, Topology, evaluate, solve_placement
from placement.stats import without_homes

log = logging.getLogger("moetrain")


def run_topology(cfg: RunConfig, placement: Placement) -> Topology:
    """The cluster's topology as the solver sees it: the placement's ranks and slots, and
    ``cluster.ranks_per_node`` / ``placement.inter_node_cost`` for the link costs."""
    return Topology(num_ranks=placement.num_ranks, slots_per_rank=placement.slots_per_rank,
                    ranks_per_node=cfg.cluster.ranks_per_node, inter_node_cost=cfg.placement.inter_node_cost)


def due(cfg: RunConfig, step: int) -> bool:
    p = cfg.placement
    return p.replan_every > 0 and step % p.replan_every == 0 and step < cfg.train.steps


@dataclass(frozen=True)
class Proposal:
    """A solve's answer and the cost model's verdict on it (current vs proposed, same stats)."""

    placement: Placement
    solver: str
    status: str
    bound: float | None
    solve_time_s: float
    cost_before: float
    cost_after: float
    sends_before: float  # expected off-rank sends per token, current placement
    sends_after: float
    imbalance_before: float  # mean over layers of rank load max/mean
    imbalance_after: float
    window_steps: int  # optimizer steps behind the statistics
    sample_tokens: int  # tokens whose top-k ids the solver saw

    @property
    def predicted_gain(self) -> float:
        return (self.cost_before - self.cost_after) / max(self.cost_before, 1e-12)


@dataclass(frozen=True)
class Decision:
    """What happened to one proposal at a step boundary."""

    step: int  # applied (or rejected) after this step
    launched_step: int
    proposal: Proposal
    migrated: bool
    bytes_moved: int = 0  # bytes really sent between ranks (all ranks together)
    experts_moved: int = 0
    migrate_s: float = 0.0
    measured_sends_before: float = math.nan  # off-rank sends per step around the migration
    measured_sends_after: float = math.nan

    @property
    def predicted_gain(self) -> float:
        return self.proposal.predicted_gain

    def to_dict(self) -> dict:
        """JSON-able record (for summary.json); the placement itself is left out."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "proposal"}
        p = {f.name: getattr(self.proposal, f.name) for f in dataclasses.fields(Proposal) if f.name != "placement"}
        return {**d, **p, "predicted_gain": self.predicted_gain}


def _solve(stats: RoutingStats, topology: Topology, current: Placement, method: str, time_limit_s: float,
           load_weight: float, migration_weight: float, seed: int) -> Proposal:
    """Runs in a Ray task: the proposal and the cost of current vs proposed on the same stats."""
    t0 = time.perf_counter()
    result = solve_placement(stats, topology, method=method, current=current, time_limit_s=time_limit_s,
                             load_weight=load_weight, migration_weight=migration_weight, seed=seed)
    before = evaluate(stats, current, topology)
    after = evaluate(stats, result.placement, topology)
    return Proposal(result.placement, result.solver, result.status, result.bound, time.perf_counter() - t0,
                    before.objective, after.objective, before.sends, after.sends,
                    float(before.imbalance_L.mean()), float(after.imbalance_L.mean()),
                    int(stats.meta.get("window_steps", 0)), stats.num_tokens)


class Replanner:
    """Holds at most one solve in flight."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._pending: tuple[ray.ObjectRef, int] | None = None  # (ObjectRef of the Proposal, launch step)
        self._remote = ray.remote(num_cpus=0)(_solve)  # tiny CPU share: never blocks the actors

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def launch(self, group, placement: Placement, step: int) -> None:
        if self._pending is not None:
            return
        stats = merge_rank_samples(group.call("routing_stats"))  # with each token's home rank
        p = self.cfg.placement
        if not p.home_ranks:
            stats = without_homes(stats)
        topo = run_topology(self.cfg, placement)
        ref = self._remote.remote(stats, topo, placement, p.method, p.time_limit_s, p.load_weight,
                                  p.migration_weight, self.cfg.train.seed)
        self._pending = (ref, step)
        log.info("step %d: re-placement solve launched (%d steps of statistics, %d sampled tokens)",
                 step, stats.meta.get("window_steps", 0), stats.num_tokens)

    def ready(self, block: bool = False) -> bool:
        if self._pending is None:
            return False
        done, _ = ray.wait([self._pending[0]], timeout=None if block else 0)
        return bool(done)

    def finish(self, group, placement: Placement, step: int) -> Decision:
        """Decide on the finished proposal and migrate if the predicted gain is enough."""
        assert self._pending is not None, "finish() without a launched solve"
        ref, launched = self._pending
        self._pending = None
        prop: Proposal = ray.get(ref)
        decision = Decision(step=step, launched_step=launched, proposal=prop, migrated=False)
        if prop.predicted_gain >= self.cfg.placement.min_gain and prop.placement != placement:
            reports = group.call("migrate", prop.placement)
            decision = dataclasses.replace(
                decision, migrated=True, bytes_moved=sum(r.bytes_sent for r in reports),
                experts_moved=sum(r.experts_sent for r in reports), migrate_s=max(r.seconds for r in reports))
        log.info("step %d: re-placement %s (predicted gain %.1f%%, sends/token %.3f -> %.3f, solve %.1f s%s)",
                 step, "MIGRATED" if decision.migrated else "kept current", 100 * prop.predicted_gain,
                 prop.sends_before, prop.sends_after, prop.solve_time_s,
                 f", {decision.experts_moved} experts, {decision.bytes_moved / 2**20:.1f} MB sent"
                 if decision.migrated else "")
        return decision


def measured_gains(decisions: list[Decision], history: list[StepMetrics], window: int = 10) -> list[Decision]:
    """Each decision with the measured off-rank sends per step, ``window`` steps before/after."""
    sends = {h.step: h.offrank_sends for h in history}
    out = []
    for d in decisions:
        before = [sends[i] for i in range(d.step - window + 1, d.step + 1) if i in sends]
        after = [sends[i] for i in range(d.step + 1, d.step + window + 1) if i in sends]
        out.append(dataclasses.replace(d, measured_sends_before=sum(before) / len(before) if before else math.nan,
                                       measured_sends_after=sum(after) / len(after) if after else math.nan))
    return out
