"""The run's gang: one Ray placement group for all ranks, and the rank -> node map it yields.

Owns: creating the placement group (one bundle per rank, ``{CPU: cluster.cpus_per_worker}`` plus
``{GPU: 1}`` with ``cluster.use_gpu``, placed with ``cluster.placement_strategy``), waiting for it
within a bound, reading which node holds each bundle, ordering the ranks so that each node's ranks
are contiguous (as Ray Train orders its workers: the driver's node first when it holds ranks, then
nodes by their first bundle; nodes numbered 0..N-1 in rank order), the scheduling options that put
rank r's actor into its bundle, a one-line diagnosis of a group that cannot be placed (which
bundles do not fit, what each node has), and removing the group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moetrain.config import RunConfig


class GangUnplaceable(RuntimeError):
    """The placement group was not placed in time; the message says what does not fit."""


@dataclass(frozen=True)
class Layout:
    """Where the ranks are: rank r runs in bundle ``bundle_of_rank[r]`` on node ``node_of_rank[r]``."""

    bundle_of_rank: tuple[int, ...]
    node_of_rank: tuple[int, ...]  # nodes 0..N-1, each node's ranks contiguous
    node_ids: tuple[str, ...]  # Ray node id (hex) of node n

    @property
    def num_nodes(self) -> int:
        return len(self.node_ids)


def order_ranks(bundle_nodes: Sequence[str], first_node: str | None = None) -> Layout:
    """Ranks for bundles that landed on ``bundle_nodes[b]`` (a Ray node id per bundle index):
    grouped by node, ``first_node`` first if it holds bundles, then nodes in the order of their
    lowest bundle index; inside a node, bundles in index order."""
    order: list[str] = []
    for node in bundle_nodes:
        if node not in order:
            order.append(node)
    if first_node in order:
        order.remove(first_node)
        order.insert(0, first_node)
    bundle_of_rank, node_of_rank = [], []
    for n, node in enumerate(order):
        for b, where in enumerate(bundle_nodes):
            if where == node:
                bundle_of_rank.append(b)
                node_of_rank.append(n)
    return Layout(tuple(bundle_of_rank), tuple(node_of_rank), tuple(order))


def bundle(cfg: RunConfig) -> dict[str, float]:
    c = cfg.cluster
    return {"CPU": float(c.cpus_per_worker), **({"GPU": 1.0} if c.use_gpu else {})}


@dataclass
class Gang:
    pg: PlacementGroup
    layout: Layout

    @classmethod
    def reserve(cls, cfg: RunConfig, wait_s: float, what: str, count: int = 0, tag: str = "") -> "Gang":
        """Create the run's placement group (``count`` bundles, default ``cluster.num_workers``;
        ``tag`` suffixes its name: a growth's extra bundles) and wait up to ``wait_s`` for it;
        ``what`` names the bound in the error (e.g. ``cluster.start_timeout_s``). Raises
        :class:`GangUnplaceable`."""
        c = cfg.cluster
        bundles = [bundle(cfg)] * (count or c.num_workers)
        pg = placement_group(bundles, strategy=c.placement_strategy, name=f"moetrain/{c.run_name}{tag}")
        try:
            if not pg.wait(timeout_seconds=wait_s):
                raise GangUnplaceable(
                    f"cannot place the worker group within {wait_s:g} s ({what}): "
                    + diagnose(bundles, c.placement_strategy)
                )
            nodes = _bundle_nodes(pg, len(bundles))
        except BaseException:
            remove_placement_group(pg)
            raise
        return cls(pg, order_ranks(nodes, ray.get_runtime_context().get_node_id()))

    def actor_options(self, rank: int) -> dict:
        """Ray options that start rank ``rank``'s actor inside its bundle."""
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg,
                placement_group_bundle_index=self.layout.bundle_of_rank[rank],
                placement_group_capture_child_tasks=False,
            )
        }

    def remove(self) -> None:
        try:
            remove_placement_group(self.pg)
        except Exception:  # already removed, or the cluster is gone
            pass


def _bundle_nodes(pg, n: int, wait_s: float = 5.0) -> list[str]:
    """The node id of each bundle of a placed group (the table can lag the ready signal briefly)."""
    deadline = time.monotonic() + wait_s
    while True:
        table = placement_group_table(pg).get("bundles_to_node_id", {})
        nodes = [table.get(b, "") for b in range(n)]
        if all(nodes) or time.monotonic() > deadline:
            if not all(nodes):
                raise GangUnplaceable(
                    f"placement group placed but bundles {[b for b in range(n) if not nodes[b]]} "
                    "have no node in Ray's placement group table"
                )
            return nodes
        time.sleep(0.1)


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def unfit_bundles(bundles: list[dict[str, float]], free_by_node: list[dict[str, float]], strategy: str) -> list[int]:
    """Bundle indices that do not fit ``free_by_node`` under ``strategy`` (first fit, largest
    free node first; STRICT_PACK: all on the one node that takes most; STRICT_SPREAD: one per node)."""
    free = [dict(f) for f in free_by_node]
    if strategy == "STRICT_PACK":
        best: list[int] = []
        for node_free in free:
            took = []
            for b, need in enumerate(bundles):
                if _fits(need, node_free):
                    took.append(b)
                    _take(need, node_free)
            best = took if len(took) > len(best) else best
        return [b for b in range(len(bundles)) if b not in best]
    out, used = [], set()
    for b, need in enumerate(bundles):
        order = sorted(range(len(free)), key=lambda i: -free[i].get("CPU", 0.0))
        node = next(
            (i for i in order if _fits(need, free[i]) and not (strategy == "STRICT_SPREAD" and i in used)), None
        )
        if node is None:
            out.append(b)
            continue
        used.add(node)
        _take(need, free[node])
    return out


def _take(need: dict[str, float], free: dict[str, float]) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def diagnose(bundles: list[dict[str, float]], strategy: str) -> str:
    """One line: which bundles do not fit what the live nodes have free now, and each node's free /
    total CPU and GPU."""
    from ray._private.state import available_resources_per_node

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    avail = available_resources_per_node()
    free = [avail.get(n["NodeID"], {}) for n in nodes]
    short = unfit_bundles(bundles, free, strategy)
    head = (
        f"bundle(s) {', '.join(map(str, short))} of {len(bundles)} ({_fmt(bundles[0])} each, {strategy}) do not fit"
        if short
        else f"all {len(bundles)} bundles ({_fmt(bundles[0])} each, {strategy}) fit what is free now "
        "(resources were in use while waiting)"
    )
    per_node = "; ".join(
        f"{n['NodeManagerAddress']} node {n['NodeID'][:8]}: "
        + ", ".join(f"{f.get(k, 0.0):g}/{n['Resources'].get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))
        + " free"
        for n, f in zip(nodes, free)
    )
    return f"{head}; the Ray cluster has {len(nodes)} node(s): {per_node or 'none'}"
