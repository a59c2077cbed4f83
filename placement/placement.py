"""The `Placement` type: which logical expert lives in which physical slot on which rank.

Owns: the frozen, JSON-serialisable mapping used by every other package. Pure numpy.

Vocabulary (EPLB's, shapes as suffixes):
- L layers (MoE layers only), E logical experts per layer, R ranks, S physical slots in all.
- Rank r owns the slots ``[slot_offset[r], slot_offset[r] + slots_per_rank[r])``; slots are laid
  out by rank, but *which expert* sits in a slot is free: contiguity of experts is never assumed.
- ``phy2log_LS[l, s]``: the logical expert in slot s of layer l. Every expert appears at least
  once per layer; an expert in several slots is *replicated* (its replicas share one weight and
  their gradients are reduced over the replicas).
- ``logcnt_LE[l, e]``: replica count; ``log2phy(l, e)``: the slots holding e.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class PlacementError(ValueError):
    """An invalid placement (the message says which layer / expert / rank)."""


@dataclass(frozen=True, eq=False)
class Placement:
    phy2log_LS: np.ndarray  # int64 [L, S]
    slots_per_rank: tuple[int, ...]  # length R, same for every layer
    num_experts: int

    def __post_init__(self) -> None:
        arr = np.asarray(self.phy2log_LS, dtype=np.int64)
        if arr.ndim != 2:
            raise PlacementError(f"phy2log_LS must be 2-D [layers, slots], got shape {arr.shape}")
        spr = tuple(int(s) for s in self.slots_per_rank)
        if not spr or any(s < 0 for s in spr):
            raise PlacementError(f"slots_per_rank must be non-negative and non-empty, got {spr}")
        if sum(spr) != arr.shape[1]:
            raise PlacementError(f"slots_per_rank sums to {sum(spr)} but phy2log_LS has {arr.shape[1]} slots")
        E = int(self.num_experts)
        if E < 1:
            raise PlacementError(f"num_experts must be >= 1, got {E}")
        if arr.size and (arr.min() < 0 or arr.max() >= E):
            raise PlacementError(f"phy2log_LS holds expert ids outside [0, {E})")
        for layer in range(arr.shape[0]):
            missing = np.setdiff1d(np.arange(E), arr[layer])
            if missing.size:
                raise PlacementError(f"layer {layer}: experts {missing.tolist()} have no slot")
        arr = arr.copy()
        arr.setflags(write=False)
        object.__setattr__(self, "phy2log_LS", arr)
        object.__setattr__(self, "slots_per_rank", spr)
        object.__setattr__(self, "num_experts", E)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log_LS.shape[0]

    @property
    def num_ranks(self) -> int:
        return len(self.slots_per_rank)

    @property
    def num_slots(self) -> int:
        return self.phy2log_LS.shape[1]

    @property
    def slot_offset_R(self) -> np.ndarray:
        """First slot of each rank, [R]."""
        return np.concatenate([[0], np.cumsum(self.slots_per_rank)[:-1]]).astype(np.int64)

    @property
    def slot_rank_S(self) -> np.ndarray:
        """Owning rank of each slot, [S]."""
        return np.repeat(np.arange(self.num_ranks), self.slots_per_rank).astype(np.int64)

    # ---- maps --------------------------------------------------------------------------
    @property
    def logcnt_LE(self) -> np.ndarray:
        """Replica count of each logical expert, [L, E]."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            np.add.at(out[layer], self.phy2log_LS[layer], 1)
        return out

    def log2phy(self, layer: int, expert: int) -> np.ndarray:
        """Slots holding ``expert`` in ``layer`` (ascending)."""
        return np.flatnonzero(self.phy2log_LS[layer] == expert)

    def rank_slots(self, rank: int) -> range:
        off = int(self.slot_offset_R[rank])
        return range(off, off + self.slots_per_rank[rank])

    def local_experts(self, layer: int, rank: int) -> np.ndarray:
        """Logical experts in rank's slots, in slot order, [slots_per_rank[rank]]."""
        s = self.rank_slots(rank)
        return self.phy2log_LS[layer, s.start : s.stop].copy()

    def expert_rank_LE(self) -> np.ndarray:
        """Owning rank of each expert's first replica, [L, E] (exact when nothing is replicated)."""
        out = np.empty((self.num_layers, self.num_experts), dtype=np.int64)
        srank = self.slot_rank_S
        for layer in range(self.num_layers):
            for s in range(self.num_slots - 1, -1, -1):
                out[layer, self.phy2log_LS[layer, s]] = srank[s]
        return out

    def holders(self, layer: int, expert: int) -> np.ndarray:
        """Ranks holding a replica of ``expert`` (sorted, unique)."""
        return np.unique(self.slot_rank_S[self.log2phy(layer, expert)])

    # ---- constructors ------------------------------------------------------------------
    @staticmethod
    def _spr(num_experts: int, num_ranks: int, slots_per_rank: int | Sequence[int] | None) -> tuple[int, ...]:
        if num_ranks < 1:
            raise PlacementError(f"num_ranks must be >= 1, got {num_ranks}")
        if slots_per_rank is None:
            if num_experts % num_ranks:
                raise PlacementError(f"{num_experts} experts do not divide over {num_ranks} ranks: give slots_per_rank")
            return (num_experts // num_ranks,) * num_ranks
        if isinstance(slots_per_rank, (int, np.integer)):
            return (int(slots_per_rank),) * num_ranks
        spr = tuple(int(s) for s in slots_per_rank)
        if len(spr) != num_ranks:
            raise PlacementError(f"slots_per_rank has {len(spr)} entries for {num_ranks} ranks")
        return spr

    @classmethod
    def contiguous(
        cls, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int | Sequence[int] | None = None
    ) -> "Placement":
        """Experts 0..E-1 in slot order (Megatron / DeepSpeed default); extra slots replicate
        experts 0, 1, ... in order."""
        spr = cls._spr(num_experts, num_ranks, slots_per_rank)
        row = np.arange(sum(spr)) % num_experts
        return cls(np.tile(row, (num_layers, 1)), spr, num_experts)

    @classmethod
    def round_robin(
        cls, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int | Sequence[int] | None = None
    ) -> "Placement":
        """Expert e on the next rank in cyclic order with a free slot (e mod R when slots are
        even); extra slots replicate experts 0, 1, ... on ranks not yet holding them."""
        spr = cls._spr(num_experts, num_ranks, slots_per_rank)
        total = sum(spr)
        rows: list[list[int]] = [[] for _ in range(num_ranks)]
        r = num_ranks - 1
        for i in range(total):
            e = i % num_experts
            free = [
                (r + j) % num_ranks
                for j in range(1, num_ranks + 1)
                if len(rows[(r + j) % num_ranks]) < spr[(r + j) % num_ranks]
            ]
            fresh = [q for q in free if e not in rows[q]]
            r = (fresh or free)[0]
            rows[r].append(e)
        row = np.array([e for rr in rows for e in rr], dtype=np.int64)
        return cls(np.tile(row, (num_layers, 1)), spr, num_experts)

    @classmethod
    def from_expert_rank(cls, expert_rank_LE: np.ndarray, num_ranks: int) -> "Placement":
        """Build from an expert -> rank assignment without replicas, [L, E]; every rank gets
        exactly the experts assigned to it (slots_per_rank taken from the first layer, all layers
        must agree)."""
        a = np.asarray(expert_rank_LE, dtype=np.int64)
        if a.ndim != 2:
            raise PlacementError(f"expert_rank_LE must be [layers, experts], got shape {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= num_ranks):
            raise PlacementError(f"expert_rank_LE holds ranks outside [0, {num_ranks})")
        L, E = a.shape
        counts = np.stack([np.bincount(a[layer], minlength=num_ranks) for layer in range(L)])
        if not (counts == counts[0]).all():
            raise PlacementError(f"layers put different numbers of experts on a rank: {counts.tolist()}")
        rows = [np.concatenate([np.flatnonzero(a[layer] == r) for r in range(num_ranks)]) for layer in range(L)]
        return cls(np.stack(rows), tuple(int(c) for c in counts[0]), E)

    @classmethod
    def random(
        cls,
        num_layers: int,
        num_experts: int,
        num_ranks: int,
        seed: int = 0,
        slots_per_rank: int | Sequence[int] | None = None,
    ) -> "Placement":
        """A random permutation of experts per layer (replicas of random experts in extra slots)."""
        spr = cls._spr(num_experts, num_ranks, slots_per_rank)
        rng = np.random.default_rng(seed)
        total = sum(spr)
        if total < num_experts:
            raise PlacementError(f"{total} slots cannot hold {num_experts} experts")
        rows = []
        for _ in range(num_layers):
            row = np.concatenate([rng.permutation(num_experts), rng.integers(0, num_experts, total - num_experts)])
            rows.append(rng.permutation(row))
        return cls(np.stack(rows), spr, num_experts)

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "slots_per_rank": list(self.slots_per_rank),
            "phy2log": self.phy2log_LS.tolist(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        try:
            return cls(np.asarray(d["phy2log"], dtype=np.int64), tuple(d["slots_per_rank"]), int(d["num_experts"]))
        except KeyError as exc:
            raise PlacementError(f"placement JSON lacks the field {exc.args[0]!r}") from None

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlacementError(f"placement JSON does not parse: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Placement)
            and self.num_experts == other.num_experts
            and self.slots_per_rank == other.slots_per_rank
            and np.array_equal(self.phy2log_LS, other.phy2log_LS)
        )

    def __hash__(self) -> int:
        return hash((self.num_experts, self.slots_per_rank, self.phy2log_LS.tobytes()))

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, experts={self.num_experts}, ranks={self.num_ranks}, "
            f"slots_per_rank={self.slots_per_rank})"
        )
