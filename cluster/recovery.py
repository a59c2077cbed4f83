"""Recovery from memory after a lost rank (elastic runs): the survivors' state, made consistent,
handed to a new group through the object store — no checkpoint read, no completed step redone.

Owns: deciding whether the step the loss cut short happened (:func:`decide`), choosing where each
object comes from (:func:`sources`), and collecting the survivors' state (:func:`collect`).

Why a consistent decision exists: the global gradient norm's all-reduce is the step's last
collective. A survivor that completed it knows every rank entered it, so every rank had already
completed every gradient collective (phase ``synced`` or later): the step **rolls forward** —
survivors that did not see the norm apply the update with the norm a survivor that did saw (the
same update, bit for bit). If no survivor completed it, no survivor applied the update: the step
**rolls back** — every survivor's weights and moments are those of the step boundary, and the
data position goes back to where the step began. Either way every survivor ends at the same step;
each expert is taken from any survivor that holds a replica (replicas are identical: their
gradients are reduced together), the dense state from one survivor (identical everywhere). Where
no survivor holds some expert, or dense optimizer state is sharded (ZeRO), there is nothing to
recover from memory: :class:`NotRecoverable` says why and the run falls back to its checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.elastic import MemoryState, choose_size, take
from moetrain.config import RunConfig
from moetrain.train.state import DENSE, expert_object_name
from placement.placement import Placement

SETTLE_S = 30.0  # how long survivors past the norm may take to finish their (local) update
STATUS_S = 10.0  # a rank that does not say where it stands within this long counts as lost


class NotRecoverable(RuntimeError):
    """The survivors' memory cannot give a consistent, complete state (the message says why)."""


@dataclass(frozen=True)
class Decision:
    step: int  # the step every survivor ends at
    forward: bool  # the cut step happened (rolled forward) or not (rolled back)
    norm: float  # the global gradient norm to roll forward with (nan when rolling back)
    to_roll: tuple[int, ...]  # survivors that must apply the update (roll forward)
    survivors: tuple[int, ...] = ()  # the ranks that answered (the others were lost too)


def decide(status: dict[int, dict]) -> Decision:
    """From each survivor's ``{"step", "phase", "norm"}`` (``RankTrainer.step_status``, after
    the survivors past the norm finished): roll the cut step forward or back."""
    steps = {r: s["step"] for r, s in status.items()}
    base = min(steps.values())
    if max(steps.values()) > base + 1:
        raise NotRecoverable(f"survivors are more than one step apart: {steps}")
    done = [r for r, s in status.items() if s["step"] == base + 1]
    if done:  # someone applied the step: everyone else must hold every gradient of it
        behind = [r for r, s in status.items() if s["step"] == base]
        unsynced = [r for r in behind if status[r]["phase"] != "synced"]
        if unsynced:
            raise NotRecoverable(f"ranks {done} applied step {base + 1} but ranks {unsynced} lack its gradients")
        return Decision(base + 1, True, float(status[done[0]]["norm"]), tuple(behind), tuple(sorted(status)))
    late = [r for r, s in status.items() if s["phase"] == "reduced"]
    if late:
        raise NotRecoverable(f"ranks {late} still apply step {base + 1}")
    if all(s["phase"] == "idle" for s in status.values()):  # the cut step finished (or never began) here
        return Decision(base, True, float("nan"), (), tuple(sorted(status)))
    return Decision(base, False, float("nan"), (), tuple(sorted(status)))


def describe(d: Decision) -> str:
    if d.to_roll:
        return f"step {d.step} rolled forward on ranks {list(d.to_roll)}"
    if d.forward:
        return f"step {d.step} completed on every survivor"
    return f"the cut step {d.step + 1} rolled back"


def sources(placement: Placement, survivors: list[int]) -> dict[int, list[str]]:
    """Which survivor hands over which object: dense state from the first survivor, each expert
    from the first survivor holding a replica of it."""
    names: dict[int, list[str]] = {r: [] for r in survivors}
    names[survivors[0]].append(DENSE)
    orphans = []
    for layer in range(placement.num_layers):
        for e in range(placement.num_experts):
            holder = next((r for r in survivors if e in set(placement.local_experts(layer, r))), None)
            if holder is None:
                orphans.append(f"layer {layer} expert {e}")
            else:
                names[holder].append(expert_object_name(layer, e))
    if orphans:
        raise NotRecoverable(
            f"no live replica of {len(orphans)} expert(s) ({', '.join(orphans[:4])}"
            f"{', ...' if len(orphans) > 4 else ''}): replicas on other nodes (placement.fault_domain) avoid this"
        )
    return names


def keep(cfg: RunConfig, survivors: list[int], node_of_rank: tuple[int, ...]) -> list[int]:
    """The survivors to go on with: as many as the largest size the config allows (:func:`~cluster.
    elastic.choose_size`), whole nodes first (the nodes with the most survivors, then by rank), so a
    dropped rank leaves the fewest nodes with an odd count. :class:`NotRecoverable` when too few."""
    n = choose_size(cfg, len(survivors))
    if n is None:
        raise NotRecoverable(f"{len(survivors)} rank(s) survived: fewer than any size the run allows")
    by_node: dict[int, list[int]] = {}
    for r in survivors:
        by_node.setdefault(node_of_rank[r], []).append(r)
    order = sorted(by_node, key=lambda k: (-len(by_node[k]), k))
    ranked = [r for k in order for r in by_node[k]]
    return sorted(ranked[:n])


def settle(actors: list, survivors: list[int], timeout_s: float = SETTLE_S) -> dict[int, dict]:
    """Each survivor's step status once none is between the norm and the end of its update. A
    rank that no longer answers was lost too (its node went with the first): it is left out."""
    deadline = time.monotonic() + timeout_s
    alive = list(survivors)
    while True:
        refs = {r: actors[r].step_status.remote() for r in alive}
        status = {}
        for r, ref in refs.items():
            try:  # a live rank's second thread answers at once; a rank on a dead node may never
                status[r] = ray.get(ref, timeout=STATUS_S)
            except (RayActorError, GetTimeoutError):
                continue
        if not status:
            raise NotRecoverable("no rank survived")
        alive = sorted(status)
        if all(s["phase"] != "reduced" for s in status.values()) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def collect(
    actors: list, placement: Placement, survivors: list[int], run_id: str, cfg: RunConfig
) -> tuple[MemoryState, Decision]:
    """Make the survivors consistent (:func:`decide`; roll forward where needed) and collect
    their state as driver-owned objects. Raises :class:`NotRecoverable` or a Ray error (a second
    loss meanwhile): the caller falls back to the checkpoint."""
    if cfg.train.zero_stage:
        raise NotRecoverable(
            f"train.zero_stage={cfg.train.zero_stage} shards the dense optimizer state over the ranks: the lost "
            "ranks' shards are gone"
        )
    status = settle(actors, survivors)
    survivors = sorted(status)
    names = sources(placement, survivors)
    decision = decide(status)
    if decision.to_roll:
        ray.get([actors[r].roll_forward.remote(decision.norm) for r in decision.to_roll], timeout=SETTLE_S)
    prepared = ray.get(
        [actors[r].snapshot_prepare.remote(decision.step, names[r], r == survivors[0]) for r in survivors],
        timeout=SETTLE_S,
    )
    state = take(actors, survivors, prepared, decision.step, placement, run_id)
    return state, decision


def gone_nodes(rank_info: list[dict], survivors: tuple[int, ...] | list[int], kept: list[int]) -> set[str]:
    """Nodes of the lost ranks (not among ``survivors``) where no ``kept`` rank lives: nothing of
    the run is left there (a rank that answered on a dying node and was then dropped does not
    vouch for it). ``rank_info``: each rank's setup report."""
    node = {i["rank"]: i["node_id"] for i in rank_info}
    return {node[r] for r in node if r not in survivors} - {node[r] for r in kept}
