"""Mt-KaHyPar as an optional placement candidate (PyPI ``mtkahypar``, imported lazily).

Owns: one layer's Mt-KaHyPar partition (km1 objective, fixed block sizes, QUALITY preset, one
thread) turned into a placement row. Experts are vertices, each distinct top-k set a hyperedge
weighted by its tokens, blocks are the ranks with exactly their slot counts; with more slots than
experts, the extra slots get replicas of the hottest experts (greedy's counts, EPLB-style) on the
least loaded rank with room that lacks them. A token touching lambda ranks sends
lambda x (1 - 1/R) rows off-rank on average (uniform origin), so minimising km1 = sum (lambda - 1)
minimises the dedup off-rank sends (load balance and home ranks are not in its objective: every
row it returns is scored by the cost model like any other candidate). With fault domains
(domains.py) the counts cover the hottest experts first, a covered expert's second replica goes
to a domain it is not on yet, and a row still short of the rule is repaired.

When ``mtkahypar`` cannot be imported, :func:`available` is False and :func:`mtk_row` returns
None: the validated selection (select.py) then runs without this candidate.

Legend: T tokens, K top-k, E experts, R ranks, S slots.
"""

from __future__ import annotations

import time

import numpy as np

from placement.baselines import replica_counts
from placement.domains import FaultDomains
from placement.hypergraph import build_hypergraph
from placement.topology import Topology

DEFAULT_SEEDS = 10  # seeded runs per layer; the best km1 on the fitted tokens wins
_STATE: dict = {}  # the imported module and its one initialised instance (initialize() runs once)


def _module():
    """The ``mtkahypar`` module and its initialised instance, or (None, None) when absent."""
    if "mod" not in _STATE:
        try:
            import mtkahypar
        except ImportError:
            return None, None
        _STATE["mod"], _STATE["inst"] = mtkahypar, mtkahypar.initialize(1)
    return _STATE["mod"], _STATE["inst"]


def available() -> bool:
    try:
        import mtkahypar  # noqa: F401
    except ImportError:
        return False
    return True


def block_sizes(topo: Topology, num_experts: int) -> list[int]:
    """Experts (not replicas) per rank: the slots, less the extra slots taken from the last ranks."""
    R = topo.num_ranks
    sizes = list(topo.slots_per_rank)
    for i in range(topo.num_slots - num_experts):
        sizes[R - 1 - i % R] -= 1
    return sizes


def partition(ids_TK: np.ndarray, num_experts: int, sizes: list[int], seed: int) -> tuple[np.ndarray, float]:
    """One Mt-KaHyPar km1 run: the block of each expert [E] with exactly ``sizes`` experts per
    block, and its km1. Raises RuntimeError when the module is absent."""
    mod, inst = _module()
    if mod is None:
        raise RuntimeError("mtkahypar is not installed")
    ids = np.asarray(ids_TK)
    ids = ids[(ids >= 0).any(axis=1)]
    hg = build_hypergraph(ids, np.ones(num_experts, dtype=np.int64))
    edges = [hg.edge_pins[a:b].tolist() for a, b in zip(hg.edge_ptr[:-1], hg.edge_ptr[1:])]
    weights = [int(w) for w in hg.weight_H]
    if not edges:  # nothing co-activated: any fixed-size split is as good
        return np.repeat(np.arange(len(sizes)), sizes).astype(np.int64), 0.0
    mod.set_seed(int(seed))
    ctx = inst.context_from_preset(mod.PresetType.QUALITY)
    ctx.logging = False
    ctx.set_partitioning_parameters(len(sizes), 0.0, mod.Objective.KM1)
    ctx.set_individual_target_block_weights([int(b) for b in sizes])
    graph = inst.create_hypergraph(ctx, num_experts, len(edges), edges, [1] * num_experts, weights)
    part = graph.partition(ctx)
    block = np.array([part.block_id(v) for v in range(num_experts)], dtype=np.int64)
    got = np.bincount(block, minlength=len(sizes))
    if not np.array_equal(got, sizes):
        raise RuntimeError(f"Mt-KaHyPar returned blocks of {got.tolist()}, asked {list(sizes)}")
    return block, float(part.km1())


def with_replicas(
    block_E: np.ndarray, load_E: np.ndarray, topo: Topology, domains: FaultDomains | None = None
) -> np.ndarray:
    """The layer row [S]: each block's experts on its rank, then the extra slots filled with
    replicas of the hottest experts (greedy's counts) on the least loaded rank with room that
    lacks them (with fault ``domains``: module docstring)."""
    if domains is not None and not domains.active:
        domains = None
    R = topo.num_ranks
    cover = None if domains is None else domains.cover_E(load_E)
    cnt = replica_counts(load_E, topo, cover)
    held: list[list[int]] = [[int(e) for e in np.flatnonzero(block_E == r)] for r in range(R)]
    free = np.array(topo.slots_per_rank) - np.array([len(h) for h in held])
    per = load_E / cnt
    rank_load = np.array([per[h].sum() for h in held])
    for e in np.argsort(-per, kind="stable"):
        for _ in range(int(cnt[e]) - 1):
            ok = np.flatnonzero((free > 0) & np.array([e not in h for h in held]))
            homes = set() if domains is None else {int(domains.domain_R[q]) for q in range(R) if e in held[q]}
            if domains is not None and len(homes) == 1:  # single-homed so far: a replica elsewhere
                away = ok[~np.isin(domains.domain_R[ok], list(homes))]
                ok = away if away.size else ok
            if ok.size:
                r = int(ok[np.argmin(rank_load[ok])])
            else:  # every free slot is on a rank holding e: move an expert f from a rank q
                r = int(np.flatnonzero(free > 0)[0])  # lacking e into it; e's replica takes f's slot
                q, f = next((q, f) for q in range(R) if e not in held[q] for f in held[q] if f not in held[r])
                held[q].remove(f)
                held[r].append(f)
                free[r] -= 1
                free[q] += 1
                rank_load[r] += per[f]
                rank_load[q] -= per[f]
                r = q
            held[r].append(int(e))
            free[r] -= 1
            rank_load[r] += per[e]
    row = np.array([e for h in held for e in h], dtype=np.int64)
    return row if domains is None or domains.valid(row) else domains.repair(row, load_E)


def mtk_row(
    ids_TK: np.ndarray,
    load_E: np.ndarray,
    topo: Topology,
    seeds: int = DEFAULT_SEEDS,
    seed: int = 0,
    deadline: float | None = None,
    domains: FaultDomains | None = None,
) -> np.ndarray | None:
    """One layer's row [S] from the best km1 of ``seeds`` runs (seeds ``seed``, ``seed`` + 1, ...;
    at least one run, fewer when ``deadline`` passes); None when ``mtkahypar`` is absent."""
    if _module()[0] is None:
        return None
    E = load_E.shape[0]
    sizes = block_sizes(topo, E)
    best = None
    for i in range(max(seeds, 1)):
        block, km1 = partition(ids_TK, E, sizes, seed + i)
        if best is None or km1 < best[1]:
            best = (block, km1)
        if deadline is not None and time.monotonic() >= deadline:
            break
    assert best is not None  # at least one seed ran
    return with_replicas(best[0], load_E, topo, domains)
