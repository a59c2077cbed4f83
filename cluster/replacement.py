"""Live re-placement: solve a better expert placement off the critical path and migrate to it.

Owns: the driver side of re-placement. Every ``placement.replan_every`` steps the ranks' routing
statistics — the trainer's moving window of ``placement.window`` steps (counts all-reduced once)
and up to ``placement.sample_tokens`` per-token top-k ids from that window — go to a Ray task that
runs the placement solver while training continues. The window is split by steps
(placement/select.py): the solver fits on the older steps, its candidates (``placement.method``
"validated": several; otherwise that method alone) are chosen and ``placement.min_gain`` is judged
on the newest ``placement.val_fraction`` of the sampled steps, which it did not see (refitted on
the whole window only where validation says fresher tokens help). When the task is done, at the
next step boundary, the predicted gain (the cost model on those validation steps: current vs
proposed placement; on the whole window, in sample, when ``val_fraction`` is 0 or the window is
too small to validate) is compared with ``placement.min_gain``; if it is enough, every rank exchanges the
moving experts' weights **and** AdamW state point to point (``moetrain.parallel.migrate``) and
training continues on the new placement. The solver scores sends from each sampled token's home
rank (``placement.home_ranks``) on the cluster's topology (:func:`run_topology`: the rank -> node
map the worker group found, ``placement.inter_node_cost``); a group rebuilt on another layout
after a node loss gets its placement re-solved at once from the last statistics (:func:`solve_now`).
Each decision is a :class:`Decision`: predicted gain,
what the solver saw, solve time, the bytes really sent, and (at the end of the run) the measured
off-rank sends per step before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any
from dataclasses import dataclass

import numpy as np
import ray

from moetrain.config import RunConfig
from moetrain.train.metrics import StepMetrics
from moetrain.train.stats import merge_rank_samples
from placement import Placement, RoutingStats, SolveResult, Topology, evaluate, solve_placement
from placement.domains import FaultDomains, domain_vector, single_homed
from placement.select import select_placement, validation_scores
from placement.stats import without_homes

log = logging.getLogger("moetrain")


def run_topology(cfg: RunConfig, placement: Placement, node_of_rank: tuple[int, ...] = ()) -> Topology:
    """The cluster's topology as the solver sees it: the placement's ranks and slots, the node of
    each rank (where the group's ranks landed; () = ``cluster.ranks_per_node``, 0 = one node) and
    ``placement.inter_node_cost`` for the link costs."""
    if node_of_rank:
        return Topology.from_nodes(
            node_of_rank, placement.slots_per_rank, inter_node_cost=cfg.placement.inter_node_cost
        )
    return Topology(
        num_ranks=placement.num_ranks,
        slots_per_rank=placement.slots_per_rank,
        ranks_per_node=cfg.cluster.ranks_per_node,
        inter_node_cost=cfg.placement.inter_node_cost,
    )


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
    node_of_rank: tuple[int, ...] = ()  # the topology's rank -> node map the solver saw
    # on the validation steps (not seen by the fit; mean over folds): objective summed over layers
    # (nan: not validated), per layer, the proposal's fit-part objective and candidate per layer
    val_before: float = math.nan
    val_after: float = math.nan
    val_tokens: int = 0
    val_before_L: tuple[float, ...] = ()
    val_after_L: tuple[float, ...] = ()
    fit_after_L: tuple[float, ...] = ()
    candidate_L: tuple[str, ...] = ()
    refit_L: tuple[bool, ...] = ()

    @property
    def validated(self) -> bool:
        return math.isfinite(self.val_before) and math.isfinite(self.val_after)

    @property
    def fit_gain(self) -> float:
        """Relative cost reduction on the whole window (in sample for the proposal)."""
        return (self.cost_before - self.cost_after) / max(self.cost_before, 1e-12)

    @property
    def predicted_gain(self) -> float:
        """What min_gain is judged on: the validation gain, or the fit gain when not validated."""
        if self.validated:
            return (self.val_before - self.val_after) / max(self.val_before, 1e-12)
        return self.fit_gain


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
        return {
            **d,
            **p,
            "predicted_gain": self.predicted_gain,
            "fit_gain": self.proposal.fit_gain,
            "judged_on": "validation" if self.proposal.validated else "fit",
        }


def _solve(
    stats: RoutingStats,
    topology: Topology,
    current: Placement,
    method: str,
    time_limit_s: float,
    load_weight: float,
    migration_weight: float,
    seed: int,
    val_fraction: float = 0.25,
    fault_domain: str = "none",
) -> Proposal:
    """Runs in a Ray task: the proposal (validated unless ``val_fraction`` is 0) and the cost of
    current vs proposed on the whole window and on the validation steps."""
    t0 = time.perf_counter()
    kw: dict[str, Any] = dict(
        current=current,
        time_limit_s=time_limit_s,
        load_weight=load_weight,
        migration_weight=migration_weight,
        seed=seed,
        fault_domain=fault_domain,
    )
    if val_fraction > 0:
        result = select_placement(stats, topology, method=method, val_fraction=val_fraction, **kw)
    else:
        result = solve_placement(stats, topology, method=method, **kw)
    before = evaluate(stats, current, topology, load_weight=load_weight)
    after = evaluate(stats, result.placement, topology, load_weight=load_weight)
    val = _validation_fields(stats, topology, current, result, load_weight, migration_weight, val_fraction)
    return Proposal(
        result.placement,
        result.solver,
        result.status,
        result.bound,
        time.perf_counter() - t0,
        before.objective,
        after.objective,
        before.sends,
        after.sends,
        float(before.imbalance_L.mean()),
        float(after.imbalance_L.mean()),
        int(stats.meta.get("window_steps", 0)),
        stats.num_tokens,
        topology.node_of_rank,
        **val,
        fit_after_L=tuple(float(r.fit_score) for r in result.layers),
        candidate_L=tuple(r.source for r in result.layers),
        refit_L=tuple(r.refit for r in result.layers),
    )


def _validation_fields(
    stats: RoutingStats,
    topology: Topology,
    current: Placement,
    result: SolveResult,
    load_weight: float,
    migration_weight: float,
    val_fraction: float,
) -> dict[str, Any]:
    """The :class:`Proposal`'s ``val_*`` fields: current vs the proposal ``result`` on the
    validation steps; {} (not validated) when ``val_fraction`` is 0, the window is too small to
    validate, or a layer's proposal has no finite validation score."""
    if val_fraction <= 0:
        return {}
    cur_L = validation_scores(
        stats,
        current,
        topology,
        load_weight=load_weight,
        migration_weight=migration_weight,
        current=current,
        val_fraction=val_fraction,
    )
    after_L = tuple(float(r.val_score) for r in result.layers)
    if cur_L is None or not all(math.isfinite(v) for v in after_L):
        return {}
    return dict(
        val_before=float(cur_L.sum()),
        val_after=float(sum(after_L)),
        val_tokens=result.layers[0].val_tokens,
        val_before_L=tuple(float(v) for v in cur_L),
        val_after_L=after_L,
    )


def solve_now(stats: RoutingStats, topology: Topology, current: Placement, cfg: RunConfig) -> Proposal:
    """A solve on the driver, waited for (a group about to start on a new topology)."""
    p = cfg.placement
    return _solve(
        stats,
        topology,
        current,
        p.method,
        p.time_limit_s,
        p.load_weight,
        p.migration_weight,
        cfg.train.seed,
        p.val_fraction,
        p.fault_domain,
    )


def honour_fault_domains(cfg: RunConfig, placement: Placement, node_of_rank: tuple[int, ...], what: str) -> Placement:
    """``placement`` with every layer meeting ``placement.fault_domain``'s rule (as many experts
    on two domains as the slots allow; ``FaultDomains.repair``, no statistics: ties by expert id)
    where it did not (e.g. a round-robin or JSON start), then its single-homed experts logged."""
    fd = cfg.placement.fault_domain
    rule = (
        None if fd == "none" else FaultDomains.of(run_topology(cfg, placement, node_of_rank), fd, placement.num_experts)
    )
    if rule is not None and rule.active and not all(rule.valid(row) for row in placement.phy2log_LS):
        even = np.ones(placement.num_experts)
        rows = np.stack([rule.repair(row, even) for row in placement.phy2log_LS])
        placement = Placement(rows, placement.slots_per_rank, placement.num_experts)
        log.info("%s: repaired for placement.fault_domain=%s", what, fd)
    log_single_homed(cfg, placement, node_of_rank, what)
    return placement


def log_single_homed(cfg: RunConfig, placement: Placement, node_of_rank: tuple[int, ...], what: str) -> None:
    """Log the experts of ``placement`` whose replicas all sit on one fault domain of the ranks'
    nodes (:func:`run_topology`; ``placement.fault_domain``, nothing is logged for "none")."""
    fd = cfg.placement.fault_domain
    dom = None if fd == "none" else domain_vector(run_topology(cfg, placement, node_of_rank), fd)
    if dom is None:
        return
    homed = single_homed(placement, dom)
    n = sum(len(h) for h in homed)
    where = "; ".join(f"layer {i}: {list(h)}" for i, h in enumerate(homed) if h) or "none"
    log.info("%s: %d expert(s) single-homed (fault domain %s): %s", what, n, fd, where)


class Replanner:
    """Holds at most one solve in flight."""

    def __init__(self, cfg: RunConfig, last_stats: RoutingStats | None = None):
        self.cfg = cfg
        self._pending: tuple[ray.ObjectRef, int] | None = None  # (ObjectRef of the Proposal, launch step)
        self.last_stats = last_stats  # what the last solve saw (kept across a group rebuild)
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
        self.last_stats = stats
        topo = run_topology(self.cfg, placement, group.node_of_rank)
        ref = self._remote.remote(  # type: ignore[call-arg]  # Ray's stubs stop at 7 arguments
            stats,
            topo,
            placement,
            p.method,
            p.time_limit_s,
            p.load_weight,
            p.migration_weight,
            self.cfg.train.seed,
            p.val_fraction,
            p.fault_domain,
        )
        self._pending = (ref, step)
        log.info(
            "step %d: re-placement solve launched (%d steps of statistics, %d sampled tokens)",
            step,
            stats.meta.get("window_steps", 0),
            stats.num_tokens,
        )

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
                decision,
                migrated=True,
                bytes_moved=sum(r.bytes_sent for r in reports),
                experts_moved=sum(r.experts_sent for r in reports),
                migrate_s=max(r.seconds for r in reports),
            )
        log.info(
            "step %d: re-placement %s (predicted gain %.1f%% on %s, fit gain %.1f%%, sends/token %.3f -> %.3f, "
            "solve %.1f s%s)",
            step,
            "MIGRATED" if decision.migrated else "kept current",
            100 * prop.predicted_gain,
            "validation" if prop.validated else "the fit",
            100 * prop.fit_gain,
            prop.sends_before,
            prop.sends_after,
            prop.solve_time_s,
            f", {decision.experts_moved} experts, {decision.bytes_moved / 2**20:.1f} MB sent"
            if decision.migrated
            else "",
        )
        if decision.migrated:
            log_single_homed(self.cfg, prop.placement, prop.node_of_rank, f"step {step}: the new placement")
        return decision


def measured_gains(decisions: list[Decision], history: list[StepMetrics], window: int = 10) -> list[Decision]:
    """Each decision with the measured off-rank sends per step, ``window`` steps before/after."""
    sends = {h.step: h.offrank_sends for h in history}
    out = []
    for d in decisions:
        before = [sends[i] for i in range(d.step - window + 1, d.step + 1) if i in sends]
        after = [sends[i] for i in range(d.step + 1, d.step + window + 1) if i in sends]
        out.append(
            dataclasses.replace(
                d,
                measured_sends_before=sum(before) / len(before) if before else math.nan,
                measured_sends_after=sum(after) / len(after) if after else math.nan,
            )
        )
    return out
