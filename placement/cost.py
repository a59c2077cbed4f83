"""The one cost model: what a placement costs, used by every solver, the CLI and the benchmark.

Owns: :class:`CostBreakdown`, :func:`evaluate`, and the per-layer pieces the solvers reuse
(:func:`virtual_ids`, the replica rule; :func:`origin_classes`, who pays what to reach a rank;
:func:`rank_hits_exact`, :func:`need_by_origin`, :func:`rank_hits_pairwise`, :func:`holders_ER`;
:func:`token_sends_T`, each token's sends, and :func:`token_objective_T`, its share of the
objective, for paired comparisons).

Legend: T tokens, L layers, K top-k, E experts, R ranks, S slots, O origin rank.

What is modelled, per layer (all figures are divided by the layer's tokens T, :func:`layer_tokens`:
the rows that hold the layer, so a trace logging one layer per row is not diluted; "per token"):

- **Origin.** With home ranks in the statistics (``RoutingStats.home_T``: the rank that routed
  each sampled token), token t starts on ``home_T[t]``: a token whose experts all live on its
  home rank sends nothing, and one that needs ranks {r} sends ``|{r} - {home}|`` rows (dedup),
  each costing ``link_cost[home, r]``. This is what lets a domain-aware rank assignment pay off:
  experts that a rank's tokens prefer can be put on that rank. Without home ranks (traces,
  aggregates) a token starts on rank o with probability ``origin_R[o]``, independent of its
  routing, as below. Both are "origin classes" (:func:`origin_classes`): O = R classes with
  home ranks, one class (the expectation over ``origin_R``) without.
- **Dispatch.** A token starts on rank o with probability ``origin_R[o]`` (independent of its
  routing) unless it has a home rank. Without home ranks, for each chosen expert e with c
  replicas it is served by the ``t mod c``-th replica of e in slot order (token index t):
  replicas split their expert's tokens evenly, as EPLB assumes; no preference for a local
  replica is modelled (a dispatcher that prefers local replicas does at least as well on
  traffic). With home ranks the rule is the dispatcher's own (``route_table``): the home's
  replica if it holds one, else the ``home mod c``-th replica (:func:`home_dispatch_slots`), so
  a replica on a token's home rank costs it nothing. The solvers' internal move scores (swap
  deltas, hypergraph, LNS) keep the ``t mod c`` split; every answer they return is scored here
  (with replicas and home ranks the exact ILP's bound is a bound for the ``t mod c`` rule only).
  A token whose experts share a destination rank is sent to that rank **once** (dedup); a token
  needing its own origin rank costs nothing there.
- **traffic** = expected link-weighted sends = ``sum_r send_weight[r] * need[r]`` where
  ``need[r]`` = tokens that must reach r and ``send_weight[r] = sum_o origin[o] cost[o, r]``
  (exact because origin is independent of routing). **sends** = the same with cost 1 for every
  other rank (the plain count of off-rank token sends).
- **load**: token-expert pairs computed by each rank (expected over origin); reported as the
  busiest rank (``max_load``, per token) and ``imbalance = max / mean``.
- **migration**: (expert, rank) copies present in the new placement but not in ``current`` (an
  expert moved or newly replicated must be fetched), times ``expert_bytes``. Not divided by T.
- **hops** (informational, not in the objective): fraction of a token's layer-to-layer expert
  transitions (e in layer l -> f in layer l+1, from ``trans_LEE``) where no rank holds both e and
  f. moetrain's combine sends every token back to its data-parallel home rank after each MoE
  layer, so transitions cost no extra traffic there; ``hops`` measures locality that a
  "stay-where-processed" dispatcher could exploit, and is reported only so it is not claimed.
- **objective** = traffic + load_weight * max_load + migration_weight * migration, per layer,
  summed over layers. Every solver minimises exactly this.

Two evaluators of ``need[o, r]``:

- **exact** (when ``topk_ids`` are present): the rule above applied token by token; with home
  ranks ``traffic = sum_{o, r} need[o, r] * link_cost[o, r]`` and ``sends = sum_{o != r}
  need[o, r]``, where ``need[o, r]`` counts the tokens of home o that must reach r.
- **pairwise** (aggregates only): ``need[r] ~= sum_{e on r} load[e]/c[e] - sum_{e<f on r}
  coact[e, f] / (c[e] c[f])`` (c = replica count; the even split in expectation). Without replicas this is
  the Bonferroni bound of the union: exact when no token has
  3+ of its experts on one rank, otherwise it underestimates traffic. The pairwise ILP (ilp.py,
  aggregates only) uses this model restricted to its top pairs; with per-token ids the exact
  hypergraph ILP (hyper_ilp.py) has the exact evaluator's objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.placement import Placement, PlacementError
from placement.stats import RoutingStats
from placement.topology import Topology


@dataclass(frozen=True)
class CostBreakdown:
    """Per-layer costs (arrays [L], per token unless noted) and their sums / means."""

    traffic_L: np.ndarray  # expected link-weighted sends per token
    sends_L: np.ndarray  # expected off-rank sends per token (dedup)
    max_load_L: np.ndarray  # token-expert pairs on the busiest rank, per token
    imbalance_L: np.ndarray  # busiest rank load / mean rank load
    migration_L: np.ndarray  # bytes (expert_bytes units) to fetch, not per token
    hops_L: np.ndarray  # cross-rank layer transitions per token, [L] (last layer 0)
    objective_L: np.ndarray
    exact: bool  # True: from per-token ids; False: pairwise approximation
    num_tokens: int

    @property
    def objective(self) -> float:
        return float(self.objective_L.sum())

    @property
    def sends(self) -> float:
        """Mean over layers of off-rank sends per token."""
        return float(self.sends_L.mean())

    @property
    def traffic(self) -> float:
        return float(self.traffic_L.mean())

    @property
    def imbalance(self) -> float:
        """Mean over layers of max/mean rank load."""
        return float(self.imbalance_L.mean())

    @property
    def migration(self) -> float:
        return float(self.migration_L.sum())

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "traffic": self.traffic,
            "sends": self.sends,
            "imbalance": self.imbalance,
            "max_imbalance": float(self.imbalance_L.max(initial=0)),
            "migration": self.migration,
            "hops": float(self.hops_L.mean()),
            "exact": self.exact,
            "num_tokens": self.num_tokens,
        }


def holders_ER(phy2log_S: np.ndarray, slot_rank_S: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """0/1 matrix [E, R]: rank r holds a replica of expert e (one layer)."""
    h = np.zeros((num_experts, num_ranks))
    h[phy2log_S, slot_rank_S] = 1.0
    return h


def virtual_ids(ids_TK: np.ndarray, phy2log_S: np.ndarray) -> np.ndarray:
    """Slot that serves each token-expert pair under cost.py's dispatch rule (token t uses the
    ``t mod c``-th replica of e, replicas in slot order), [T, K] (-1 stays -1)."""
    S = phy2log_S.shape[0]
    E = int(phy2log_S.max()) + 1 if S else 0
    order = np.argsort(phy2log_S, kind="stable")  # slots grouped by expert, ascending slot
    cnt_E = np.bincount(phy2log_S, minlength=E)
    first_E = np.concatenate([[0], np.cumsum(cnt_E)[:-1]])
    safe = np.maximum(ids_TK, 0)
    j = np.arange(ids_TK.shape[0])[:, None] % cnt_E[safe]
    return np.where(ids_TK >= 0, order[first_E[safe] + j], -1)


def rank_hits_exact(
    ids_TK: np.ndarray, phy2log_S: np.ndarray, slot_rank_S: np.ndarray, num_ranks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``need_R`` (tokens that must reach r, incl. their origin) and ``load_R``
    (token-expert pairs computed on r) of one layer under the dispatch rule above."""
    T = ids_TK.shape[0]
    dest_TK = np.where(ids_TK >= 0, slot_rank_S[np.maximum(virtual_ids(ids_TK, phy2log_S), 0)], num_ranks)
    hit_TR = np.zeros((T, num_ranks + 1), dtype=bool)
    hit_TR[np.arange(T)[:, None], dest_TK] = True
    need_R = hit_TR[:, :num_ranks].sum(axis=0).astype(np.float64)
    load_R = np.bincount(dest_TK.ravel(), minlength=num_ranks + 1)[:num_ranks].astype(np.float64)
    return need_R, load_R


def origin_classes(stats: RoutingStats, topo: Topology) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Who pays what to reach a rank: ``(origin_T, w_OR, off_OR)``.

    With home ranks: ``origin_T = home_T`` [T], ``w_OR = link_cost_RR`` (cost of one token of
    home o reaching r) and ``off_OR = 1 - I`` (a send unless r is the home). Without:
    ``origin_T = None`` (every token in class 0), ``w_OR = send_weight_R[None]`` and
    ``off_OR = offrank_weight_R[None]`` (expectations over ``topo.origin_R``)."""
    R = topo.num_ranks
    if stats.home_T is None:
        return None, topo.send_weight_R[None, :], topo.offrank_weight_R[None, :]
    if stats.num_home_ranks > R:
        raise PlacementError(f"statistics hold home rank {stats.num_home_ranks - 1}, the topology has {R} ranks")
    return stats.home_T, topo.link_cost_RR, 1.0 - np.eye(R)


def home_dispatch_slots(
    ids_TK: np.ndarray, home_T: np.ndarray, phy2log_S: np.ndarray, slot_rank_S: np.ndarray, num_ranks: int
) -> np.ndarray:
    """Slot that serves each token-expert pair of a token routed on rank ``home_T[t]``, by the
    dispatcher's rule (moetrain/parallel/dispatcher.py ``route_table``): the home's own replica
    if it holds one, else the ``home mod c``-th replica in slot order, [T, K] (-1 stays -1)."""
    S = phy2log_S.shape[0]
    E = int(phy2log_S.max()) + 1 if S else 0
    slot_RE = np.empty((num_ranks, E), dtype=np.int64)
    for e in range(E):
        slots = np.flatnonzero(phy2log_S == e)
        own_RS = slot_rank_S[slots][None, :] == np.arange(num_ranks)[:, None]
        slot_RE[:, e] = np.where(own_RS.any(1), slots[own_RS.argmax(1)], slots[np.arange(num_ranks) % slots.size])
    return np.where(ids_TK >= 0, slot_RE[home_T[:, None], np.maximum(ids_TK, 0)], -1)


def dest_ranks(
    ids_TK: np.ndarray, phy2log_S: np.ndarray, slot_rank_S: np.ndarray, num_ranks: int, origin_T: np.ndarray | None
) -> np.ndarray:
    """Rank that serves each token-expert pair [T, K] under the dispatch rule (``num_ranks`` for a
    missing id): replica ``t mod c`` without home ranks, the dispatcher's rule with them."""
    if origin_T is None:
        slot_TK = virtual_ids(ids_TK, phy2log_S)
    else:
        slot_TK = home_dispatch_slots(ids_TK, origin_T, phy2log_S, slot_rank_S, num_ranks)
    return np.where(ids_TK >= 0, slot_rank_S[np.maximum(slot_TK, 0)], num_ranks)


def need_by_origin(
    ids_TK: np.ndarray,
    phy2log_S: np.ndarray,
    slot_rank_S: np.ndarray,
    num_ranks: int,
    origin_T: np.ndarray | None,
    num_origins: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``need_OR[o, r]``: tokens of origin class o that must reach rank r (dedup, the home
    included), and ``load_R``, for one layer under the dispatch rule. ``origin_T`` None: one class
    (replica ``t mod c``); with home ranks, the dispatcher's rule (:func:`home_dispatch_slots`)."""
    T = ids_TK.shape[0]
    dest_TK = dest_ranks(ids_TK, phy2log_S, slot_rank_S, num_ranks, origin_T)
    hit_TR = np.zeros((T, num_ranks + 1), dtype=bool)
    hit_TR[np.arange(T)[:, None], dest_TK] = True
    o_T = np.zeros(T, dtype=np.int64) if origin_T is None else origin_T
    need_OR = np.zeros((num_origins, num_ranks))
    np.add.at(need_OR, o_T, hit_TR[:, :num_ranks].astype(np.float64))
    load_R = np.bincount(dest_TK.ravel(), minlength=num_ranks + 1)[:num_ranks].astype(np.float64)
    return need_OR, load_R


def rank_hits_pairwise(
    load_E: np.ndarray, coact_EE: np.ndarray, phy2log_S: np.ndarray, slot_rank_S: np.ndarray, num_ranks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise-model ``need_R`` and ``load_R`` for one layer (see module docstring)."""
    E = load_E.shape[0]
    cnt_E = np.bincount(phy2log_S, minlength=E).astype(np.float64)
    share_S = load_E[phy2log_S] / cnt_E[phy2log_S]
    load_R = np.bincount(slot_rank_S, weights=share_S, minlength=num_ranks)
    need_R = load_R.copy()
    for r in range(num_ranks):
        ex = phy2log_S[slot_rank_S == r]
        ex = np.unique(ex)
        sub = coact_EE[np.ix_(ex, ex)] / np.outer(cnt_E[ex], cnt_E[ex])
        need_R[r] -= sub.sum() / 2.0
    return need_R, load_R


def token_sends_T(stats: RoutingStats, placement: Placement, topology: Topology) -> np.ndarray:
    """[T] each token's off-rank sends (dedup, the exact evaluator's rule), mean over layers,
    each layer scaled by T / (that layer's tokens): its mean is ``evaluate(...).sends``. For paired
    comparisons of two placements on the same tokens (scripts/bench/bench_placement.py's bootstrap
    interval). Needs per-token ids."""
    if stats.topk_ids_TLK is None:
        raise PlacementError("token_sends_T needs per-token topk_ids; these statistics hold aggregates only")
    check_compatible(stats, placement, topology)
    R, L = topology.num_ranks, stats.num_layers
    T = stats.topk_ids_TLK.shape[0]
    origin_T, _, off_OR = origin_classes(stats, topology)
    off_TR = off_OR[np.zeros(T, dtype=np.int64) if origin_T is None else origin_T]
    out_T = np.zeros(T)
    for l in range(L):
        # the dispatch rule evaluate() uses: replica t mod c, or the home's rule with home ranks
        dest_TK = dest_ranks(stats.topk_ids_TLK[:, l], placement.phy2log_LS[l], placement.slot_rank_S, R, origin_T)
        hit_TR = np.zeros((T, R + 1), dtype=bool)
        hit_TR[np.arange(T)[:, None], dest_TK] = True
        # per layer divided by that layer's tokens (layer_tokens), as evaluate() does
        out_T += (hit_TR[:, :R] * off_TR).sum(axis=1) * T / max(layer_tokens(stats, l), 1)
    return out_T / max(L, 1)


def token_objective_T(stats: RoutingStats, placement: Placement, topology: Topology, load_weight: float) -> np.ndarray:
    """[T] each token's share of the objective (less migration), summed over layers: its
    link-weighted traffic plus ``load_weight`` x its token-expert pairs on the layer's busiest rank,
    each layer scaled by T / (that layer's tokens), so its mean is ``evaluate(...)``'s traffic +
    load_weight x max_load. The busiest rank's load split over the tokens that put it there: the
    paired differences of two placements give the standard error of their objective difference
    (select.py), not only of their sends. Needs per-token ids."""
    if stats.topk_ids_TLK is None:
        raise PlacementError("token_objective_T needs per-token topk_ids; these statistics hold aggregates only")
    check_compatible(stats, placement, topology)
    R, T = topology.num_ranks, stats.topk_ids_TLK.shape[0]
    origin_T, w_OR, _ = origin_classes(stats, topology)
    w_TR = w_OR[np.zeros(T, dtype=np.int64) if origin_T is None else origin_T]
    out_T = np.zeros(T)
    for l in range(stats.num_layers):
        dest_TK = dest_ranks(stats.topk_ids_TLK[:, l], placement.phy2log_LS[l], placement.slot_rank_S, R, origin_T)
        hit_TR = np.zeros((T, R + 1), dtype=bool)
        hit_TR[np.arange(T)[:, None], dest_TK] = True
        busiest = int(np.argmax(np.bincount(dest_TK.ravel(), minlength=R + 1)[:R]))
        own_T = (hit_TR[:, :R] * w_TR).sum(axis=1) + load_weight * (dest_TK == busiest).sum(axis=1)
        out_T += own_T * T / max(layer_tokens(stats, l), 1)
    return out_T


def transition_hops(trans_EE: np.ndarray, hold_a_ER: np.ndarray, hold_b_ER: np.ndarray) -> float:
    """Transitions e -> f (counts) where no rank holds both e (layer a) and f (layer b)."""
    together_EE = (hold_a_ER @ hold_b_ER.T) > 0
    return float(trans_EE[~together_EE].sum())


def migration_bytes(hold_new_ER: np.ndarray, hold_cur_ER: np.ndarray, expert_bytes: float = 1.0) -> float:
    """Bytes to fetch: (expert, rank) copies in the new placement absent from the current one."""
    return float(((hold_new_ER > 0) & (hold_cur_ER == 0)).sum()) * expert_bytes


def check_compatible(stats: RoutingStats, placement: Placement, topo: Topology) -> None:
    if placement.num_experts != stats.num_experts:
        raise PlacementError(f"placement has {placement.num_experts} experts, statistics {stats.num_experts}")
    if placement.num_layers != stats.num_layers:
        raise PlacementError(f"placement has {placement.num_layers} layers, statistics {stats.num_layers}")
    if placement.slots_per_rank != topo.slots_per_rank:
        raise PlacementError(
            f"placement slots_per_rank {placement.slots_per_rank} != topology slots_per_rank {topo.slots_per_rank}"
        )


def layer_tokens(stats: RoutingStats, l: int) -> int:
    """Tokens behind layer l: the ``topk_ids`` rows holding an id in that layer (a trace whose
    rows each log one layer has fewer than T per layer), or ``load.sum() / k`` from aggregates.
    Every per-token figure of layer l is divided by this."""
    return int(stats.tokens_L[l])


def layer_cost(
    stats: RoutingStats, l: int, phy2log_S: np.ndarray, topo: Topology, exact: bool
) -> tuple[float, float, float, float, int]:
    """(traffic, sends, max_load, imbalance, T) of one layer, per token."""
    R = topo.num_ranks
    slot_rank_S = np.repeat(np.arange(R), topo.slots_per_rank)
    if exact:
        assert stats.topk_ids_TLK is not None  # the exact phases run on per-token ids
        origin_T, w_OR, off_OR = origin_classes(stats, topo)
        need_OR, load_R = need_by_origin(stats.topk_ids_TLK[:, l], phy2log_S, slot_rank_S, R, origin_T, w_OR.shape[0])
        T = layer_tokens(stats, l)
        traffic, sends = float((w_OR * need_OR).sum()), float((off_OR * need_OR).sum())
    else:
        need_R, load_R = rank_hits_pairwise(stats.load_LE[l], stats.coact_LEE[l], phy2log_S, slot_rank_S, R)
        T = layer_tokens(stats, l)
        traffic = float(topo.send_weight_R @ need_R)
        sends = float(topo.offrank_weight_R @ need_R)
    T = max(T, 1)
    mean = load_R.mean()
    imb = float(load_R.max() / mean) if mean > 0 else 1.0
    return traffic / T, sends / T, float(load_R.max()) / T, imb, T


def evaluate(
    stats: RoutingStats,
    placement: Placement,
    topology: Topology,
    *,
    current: Placement | None = None,
    load_weight: float = 1.0,
    migration_weight: float = 0.0,
    expert_bytes: float = 1.0,
    exact: bool | None = None,
) -> CostBreakdown:
    """Cost of ``placement`` under ``stats`` (see the module docstring for the model).

    ``exact=None`` uses the exact evaluator when per-token ids are present, else the pairwise one.
    """
    check_compatible(stats, placement, topology)
    if current is not None:
        check_compatible(stats, current, topology)
    if exact is None:
        exact = stats.topk_ids_TLK is not None
    if exact and stats.topk_ids_TLK is None:
        raise PlacementError("exact evaluation needs per-token topk_ids; these statistics hold aggregates only")
    L, R, E = stats.num_layers, topology.num_ranks, stats.num_experts
    rows = np.zeros((6, L))
    srank = placement.slot_rank_S
    holds = [holders_ER(placement.phy2log_LS[l], srank, E, R) for l in range(L)]
    T = 1
    for l in range(L):
        traffic, sends, max_load, imb, T = layer_cost(stats, l, placement.phy2log_LS[l], topology, exact)
        rows[:4, l] = traffic, sends, max_load, imb
        if current is not None:
            rows[4, l] = migration_bytes(holds[l], holders_ER(current.phy2log_LS[l], srank, E, R), expert_bytes)
        if l + 1 < L:
            rows[5, l] = transition_hops(stats.trans_LEE[l], holds[l], holds[l + 1]) / T
    objective = rows[0] + load_weight * rows[2] + migration_weight * rows[4]
    return CostBreakdown(
        *rows,
        objective_L=objective,
        exact=bool(exact),  # type: ignore[misc]  # rows: 6 fields
        num_tokens=stats.num_tokens,
    )
