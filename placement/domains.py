"""Fault domains: which ranks fail together, and keeping every expert alive across one failure.

Owns: the fault-domain vector of a topology (:func:`domain_vector`), how many experts the slots
allow to be multi-homed (:func:`max_multi_homed`), :class:`FaultDomains` (the rule one solve
keeps, the masks its heuristics use, the repair of a row that breaks it) and the report of the
single-homed experts of a placement (:func:`single_homed`). Pure numpy.

Legend: L layers, E experts, R ranks, S slots, D fault domains, V vertices (expert replicas).

``fault_domain`` (``placement.fault_domain`` in moetrain's config):

- ``"none"``: no rule; every solver path is exactly what it was before fault domains.
- ``"node"``: the ranks of one node fail together (the topology's ``node_of_rank``, the map the
  worker group read from where its ranks landed).
- ``"rank"``: every rank is its own domain (a rank lost takes only its own slots).

An expert is **multi-homed** when its replicas sit on at least two domains (it survives the loss
of any one of them), else **single-homed**.

**What the slots allow** (per layer; every layer has the same slots, so the same number): the
largest ``k <= min(E, S - E)`` with ``sum_d min(C_d, k) >= 2 k``, ``C_d`` the slots of domain d. A
multi-homed expert takes a slot on two different domains, and one domain can give each of the k
experts at most one of its two (hence ``min(C_d, k)``); every other expert still needs a slot
(``2 k + (E - k) <= S``). Examples, 4 experts on 4 ranks in 2 nodes: 2 slots per rank, k = 4 (every
expert on both nodes); 5 slots in all, k = 1; one node (``"node"``), k = 0.

**The rule** a solve keeps with a domain vector: every layer of its answer has k multi-homed
experts, as many as the slots allow. Which ones: the hottest first (Lazarus's load-proportional
replicas). The replica counts give the k hottest experts of the layer a second replica
(baselines.replica_counts), the packing puts the two on different domains (baselines.pack_lpt),
and the spare slots beyond that go one at a time to the expert with the highest load per
replica, as without domains. Every later phase (swap and tabu search, FM, the MIPs with a
constraint per expert and domain) keeps multi-homed the experts that are; every row a phase
offers is checked (phases.Best) and the baselines are repaired (:meth:`FaultDomains.repair`), so
no path returns a row with fewer than k. The cost model is unchanged: the rule is a constraint,
not a cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.placement import Placement, PlacementError
from placement.topology import Topology

FAULT_DOMAINS = ("none", "node", "rank")


def domain_vector(topology: Topology, fault_domain: str) -> np.ndarray | None:
    """The fault domain of each rank, int64 [R] (domains numbered 0..D-1); None for "none"."""
    if fault_domain not in FAULT_DOMAINS:
        raise PlacementError(f"fault_domain ({fault_domain!r}) must be one of {', '.join(FAULT_DOMAINS)}")
    if fault_domain == "none":
        return None
    if fault_domain == "node":
        return topology.node_R.copy()
    return np.arange(topology.num_ranks, dtype=np.int64)


def max_multi_homed(slots_per_rank: tuple[int, ...], domain_R: np.ndarray, num_experts: int) -> int:
    """How many experts of a layer the slots allow to be multi-homed (module docstring)."""
    slots_D = np.bincount(domain_R, weights=np.asarray(slots_per_rank, dtype=np.float64))
    k = min(num_experts, int(sum(slots_per_rank)) - num_experts)
    while k > 0 and np.minimum(slots_D, k).sum() < 2 * k:
        k -= 1
    return max(k, 0)


def _domain_counts(expert_X: np.ndarray, domain_X: np.ndarray, num_experts: int, num_domains: int) -> np.ndarray:
    """[E, D]: replicas of expert e on domain d (X: slots or vertices)."""
    out = np.zeros((num_experts, num_domains), dtype=np.int64)
    np.add.at(out, (expert_X, domain_X), 1)
    return out


@dataclass(frozen=True, eq=False)
class FaultDomains:
    """The rule of one solve: the domain of each rank and the multi-homed experts per layer."""

    domain_R: np.ndarray  # int64 [R]
    slots_per_rank: tuple[int, ...]
    num_experts: int
    num_multi: int  # experts per layer that must be multi-homed (what the slots allow)

    @classmethod
    def of(cls, topology: Topology, fault_domain: str, num_experts: int) -> "FaultDomains | None":
        """The rule for ``fault_domain`` on ``topology`` (None for "none")."""
        dom = domain_vector(topology, fault_domain)
        if dom is None:
            return None
        k = max_multi_homed(topology.slots_per_rank, dom, num_experts)
        return cls(dom, topology.slots_per_rank, int(num_experts), k)

    @property
    def active(self) -> bool:
        """Whether the rule constrains anything (the slots allow a multi-homed expert)."""
        return self.num_multi > 0

    @property
    def num_domains(self) -> int:
        return int(self.domain_R.max()) + 1

    @property
    def rank_S(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.slots_per_rank)), self.slots_per_rank)

    @property
    def domain_S(self) -> np.ndarray:
        """Domain of each slot, [S]."""
        return self.domain_R[self.rank_S]

    def counts_ED(self, row_S: np.ndarray) -> np.ndarray:
        return _domain_counts(row_S, self.domain_S, self.num_experts, self.num_domains)

    def multi_homed_E(self, row_S: np.ndarray) -> np.ndarray:
        """bool [E]: expert e of the layer row has replicas on two domains or more."""
        return (self.counts_ED(row_S) > 0).sum(axis=1) >= 2

    def valid(self, row_S: np.ndarray) -> bool:
        """The row has as many multi-homed experts as the slots allow."""
        return int(self.multi_homed_E(row_S).sum()) >= self.num_multi

    def cover_E(self, load_E: np.ndarray) -> np.ndarray:
        """bool [E]: the ``num_multi`` hottest experts (ties: the lower id), the ones to cover."""
        out = np.zeros(self.num_experts, dtype=bool)
        out[np.argsort(-np.asarray(load_E), kind="stable")[: self.num_multi]] = True
        return out

    def unhoming_swaps(self, row_S: np.ndarray) -> np.ndarray:
        """bool [S, S]: exchanging the contents of slots s and u leaves an expert that is
        multi-homed now single-homed."""
        C = self.counts_ED(row_S)
        nd_E = (C > 0).sum(axis=1)
        d, e = self.domain_S, row_S
        leaves = (C[e, d] == 1)[:, None]  # s holds the last replica of its expert on its domain
        arrives = C[e[:, None], d[None, :]] == 0  # ... which has none on u's domain yet
        after = nd_E[e][:, None] - leaves + arrives  # [S, S] domains of s's expert after the swap
        bad = (nd_E[e] >= 2)[:, None] & (d[:, None] != d[None, :]) & (after < 2)
        return bad | bad.T

    def unhoming_moves(self, expert_V: np.ndarray, rank_V: np.ndarray) -> np.ndarray:
        """bool [V, R]: moving vertex v to rank r leaves its expert, multi-homed now,
        single-homed (FM's single-vertex moves, refine.py)."""
        d_V = self.domain_R[rank_V]
        C = _domain_counts(expert_V, d_V, self.num_experts, self.num_domains)
        nd_E = (C > 0).sum(axis=1)
        to = self.domain_R[None, :]  # [1, R]
        after = nd_E[expert_V][:, None] - (C[expert_V, d_V] == 1)[:, None] + (C[expert_V[:, None], to] == 0)
        return (nd_E[expert_V] >= 2)[:, None] & (d_V[:, None] != to) & (after < 2)

    def repair(self, row_S: np.ndarray, load_E: np.ndarray) -> np.ndarray:
        """The row with single-homed experts made multi-homed, hottest first, until the layer
        has as many as the slots allow: a copy of a replicated expert on another domain becomes
        the expert's (when that copy's expert stays present and as homed as it was), else one
        of the expert's replicas changes place with an expert of another domain. Returns the
        row unchanged when it is valid (or nothing helps)."""
        row = np.asarray(row_S, dtype=np.int64).copy()
        for e in np.argsort(-np.asarray(load_E), kind="stable"):
            if self.valid(row):
                break
            if not self.multi_homed_E(row)[e]:
                row = self._take_a_copy(row, int(e), load_E)
                if not self.multi_homed_E(row)[e]:
                    row = self._swap_in(row, int(e))
        return row

    def _take_a_copy(self, row: np.ndarray, e: int, load_E: np.ndarray) -> np.ndarray:
        """e takes the slot of a spare replica of another expert on another domain."""
        rank_S, dom_S = self.rank_S, self.domain_S
        cnt_E = np.bincount(row, minlength=self.num_experts)
        multi = self.multi_homed_E(row)
        home = set(dom_S[row == e].tolist())
        held = set(rank_S[row == e].tolist())
        per_E = np.asarray(load_E, dtype=np.float64) / np.maximum(cnt_E, 1)
        for u in sorted(range(len(row)), key=lambda s: (per_E[row[s]], s)):
            f = int(row[u])
            if f == e or cnt_E[f] < 2 or dom_S[u] in home or rank_S[u] in held:
                continue
            cand = row.copy()
            cand[u] = e
            if not multi[f] or self.multi_homed_E(cand)[f]:
                return cand
        return row

    def _swap_in(self, row: np.ndarray, e: int) -> np.ndarray:
        """One of e's replicas changes place with an expert f of another domain (f not on e's
        rank, e not on f's, f as homed as it was)."""
        rank_S, dom_S = self.rank_S, self.domain_S
        multi = self.multi_homed_E(row)
        if (row == e).sum() < 2:  # one replica stays single-homed wherever it goes
            return row
        for s in np.flatnonzero(row == e):
            for u in range(len(row)):
                f = int(row[u])
                if f == e or dom_S[u] == dom_S[s] or (row[rank_S == rank_S[s]] == f).any():
                    continue
                if (row[rank_S == rank_S[u]] == e).any():
                    continue
                cand = row.copy()
                cand[s], cand[u] = f, e
                if not multi[f] or self.multi_homed_E(cand)[f]:
                    return cand
        return row

    def single_homed(self, placement: Placement) -> tuple[tuple[int, ...], ...]:
        return single_homed(placement, self.domain_R)


def single_homed(placement: Placement, domain_R: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """Per layer, the experts whose replicas all sit on one fault domain (ascending ids); a
    placement with as many multi-homed experts as the slots allow has ``E - k`` of them."""
    dom = np.asarray(domain_R, dtype=np.int64)
    if dom.shape != (placement.num_ranks,):
        raise PlacementError(f"domain_R has shape {dom.shape}, the placement has {placement.num_ranks} ranks")
    d_S = dom[placement.slot_rank_S]
    out = []
    for row in placement.phy2log_LS:
        C = _domain_counts(row, d_S, placement.num_experts, int(dom.max()) + 1)
        out.append(tuple(int(e) for e in np.flatnonzero((C > 0).sum(axis=1) < 2)))
    return tuple(out)
