"""Bytes a rank sends, by kind and by link class, counted where they are sent.

Owns: :class:`TrafficCounter` (one per rank: python-int accumulators, no collective, no host
sync), :class:`LayerTally` (the view an MoE layer's all-to-alls count through), the ring
all-reduce estimate for gradient collectives, and :class:`StepTraffic`, the frozen per-step
record in :class:`~moetrain.train.metrics.StepMetrics` (summed over ranks).

Link classes: ``intra`` = to another rank of the same node, ``inter`` = to a rank of another node
(``ParallelContext.node_R``; ``()`` = one node, so everything is ``intra``). Rows a rank "sends"
to itself are a local copy and are not counted.

Kinds and how each is counted:
- ``a2a`` (per MoE layer, forward and backward): every token all-to-all of the dispatchers
  counts ``rows sent to rank r x bytes per row`` from the splits it already has — payload rows
  (row + K weights), the int metadata (destination slots, the count exchange) and the returned
  rows; in backward the gradients of each autograd all-to-all travel the reverse way and are
  counted by the rank that sends them (``moetrain.parallel.a2a``).
- ``dense_grads`` (dense gradient all-reduce, or DeepSpeed ZeRO-1/2's reduce-scatter + all-gather)
  and ``expert_grads`` (the replica reduction of replicated experts): an *estimate* of a ring
  all-reduce of B bytes over R ranks: each rank sends ``2 (R-1)/R x B`` to rank ``(r+1) mod R``,
  so the ring's node crossings decide ``inter``. The scalar all-reduces (losses, norms, counts:
  a few hundred bytes) are not counted.
- ``migration``: expert rows + AdamW moments sent point to point (``moetrain.parallel.migrate``).
- ``checkpoint``: bytes this rank uploaded to the checkpoint store (no link class: the store is
  outside the group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

LINKS = ("intra", "inter")
PEER_KINDS = ("dense_grads", "expert_grads", "migration")  # kinds with a link class besides a2a


def node_of(node_R: tuple[int, ...], rank: int) -> int:
    """Node index of ``rank`` (0 when the map is empty: one node)."""
    return node_R[rank] if node_R else 0


def link_of_R(node_R: tuple[int, ...], rank: int, world_size: int) -> list[int]:
    """Link class from ``rank`` to every rank: 0 = intra (same node, itself included), 1 = inter."""
    me = node_of(node_R, rank)
    return [int(node_of(node_R, r) != me) for r in range(world_size)]


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: ``2 (R-1)/R x nbytes``."""
    return 0 if world_size <= 1 else (2 * (world_size - 1) * nbytes) // world_size


@dataclass(frozen=True)
class StepTraffic:
    """Bytes sent in one optimizer step, summed over ranks ([..., 2] = (intra, inter))."""

    a2a_LPC: np.ndarray  # [L, 2, 2] expert all-to-all per MoE layer, (forward, backward), link
    dense_grads_C: np.ndarray  # [2] dense gradient all-reduce / ZeRO collectives (ring estimate)
    expert_grads_C: np.ndarray  # [2] replica gradient reduction (ring estimate)
    migration_C: np.ndarray  # [2] expert migration since the previous step
    checkpoint_bytes: float = 0.0  # uploaded to the checkpoint store since the previous step

    def by_kind(self) -> dict[str, tuple[float, float]]:
        """``{kind: (intra, inter)}`` for a2a, dense_grads, expert_grads, migration."""
        a2a = self.a2a_LPC.sum(axis=(0, 1))
        return {
            "a2a": (float(a2a[0]), float(a2a[1])),
            **{k: (float(getattr(self, f"{k}_C")[0]), float(getattr(self, f"{k}_C")[1])) for k in PEER_KINDS},
        }

    @property
    def inter_bytes(self) -> float:
        return sum(v[1] for v in self.by_kind().values())

    @property
    def intra_bytes(self) -> float:
        return sum(v[0] for v in self.by_kind().values())

    def to_dict(self) -> dict:
        return {
            "a2a_LPC": self.a2a_LPC.tolist(),
            **{f"{k}_C": getattr(self, f"{k}_C").tolist() for k in PEER_KINDS},
            "checkpoint_bytes": self.checkpoint_bytes,
        }

    @classmethod
    def empty(cls, num_layers: int = 0) -> "StepTraffic":
        z = np.zeros(2)
        return cls(np.zeros((num_layers, 2, 2)), z, z.copy(), z.copy())


class LayerTally:
    """What one MoE layer's all-to-alls count through (see ``moetrain.parallel.a2a``)."""

    __slots__ = ("counter", "layer")

    def __init__(self, counter: "TrafficCounter", layer: int) -> None:
        self.counter, self.layer = counter, layer

    def sent(self, inp: torch.Tensor, in_splits: list[int], *, backward: bool = False) -> None:
        """``in_splits[r]`` rows of ``inp`` go to rank r."""
        row_bytes = inp.element_size() * math.prod(inp.shape[1:])  # also with 0 rows (nothing to send)
        self.counter.add_rows(self.counter.a2a_LPC[self.layer, int(backward)], in_splits, row_bytes)


class TrafficCounter:
    """This rank's sent bytes since the last :meth:`drain` (python ints: no device work)."""

    def __init__(self, rank: int, world_size: int, node_R: tuple[int, ...], num_layers: int) -> None:
        if node_R and len(node_R) != world_size:
            raise ValueError(f"node map {node_R} has {len(node_R)} entries for {world_size} ranks")
        self.rank, self.world_size, self.num_layers = rank, world_size, num_layers
        self.link_R = link_of_R(node_R, rank, world_size)  # 0 intra, 1 inter
        self._reset()

    def _reset(self) -> None:
        self.a2a_LPC = np.zeros((self.num_layers, 2, 2), dtype=np.int64)
        self.peer_KC = {k: np.zeros(2, dtype=np.int64) for k in PEER_KINDS}
        self.checkpoint_bytes = 0

    def layer(self, index: int) -> LayerTally:
        return LayerTally(self, index)

    def add_rows(self, acc_C: np.ndarray, rows_R: list[int], row_bytes: int) -> None:
        for r, n in enumerate(rows_R):
            if r != self.rank and n:
                acc_C[self.link_R[r]] += n * row_bytes

    def add_peer(self, kind: str, bytes_R: list[int]) -> None:
        """``bytes_R[r]`` bytes of ``kind`` sent to rank r."""
        self.add_rows(self.peer_KC[kind], bytes_R, 1)

    def add_ring_allreduce(self, kind: str, nbytes: int) -> None:
        """Estimate of a ring all-reduce of ``nbytes``: this rank sends to its successor."""
        dst = [0] * self.world_size
        dst[(self.rank + 1) % self.world_size] = ring_allreduce_bytes(nbytes, self.world_size)
        self.add_peer(kind, dst)

    def add_node_allreduce(self, kind: str, nbytes: int, node_R: tuple[int, ...]) -> None:
        """Estimate of :meth:`ParallelContext.all_reduce_dense` over nodes: a non-leader sends
        ``nbytes`` to its leader (reduce); a leader sends its ring share to the next node's leader
        and ``nbytes`` to each rank of its node (broadcast)."""
        nodes = sorted(set(node_R))
        first = {n: min(r for r in range(self.world_size) if node_R[r] == n) for n in nodes}
        me = node_R[self.rank]
        dst = [0] * self.world_size
        if self.rank != first[me]:
            dst[first[me]] = nbytes
        else:
            nxt = nodes[(nodes.index(me) + 1) % len(nodes)]
            dst[first[nxt]] += ring_allreduce_bytes(nbytes, len(nodes))
            for r in range(self.world_size):
                if node_R[r] == me and r != self.rank:
                    dst[r] += nbytes
        self.add_peer(kind, dst)

    def add_checkpoint(self, nbytes: int) -> None:
        self.checkpoint_bytes += int(nbytes)

    def vector(self) -> torch.Tensor:
        """Everything counted, flat float64 (exact below 2**53 bytes), for one all-reduce."""
        parts = [self.a2a_LPC.reshape(-1)] + [self.peer_KC[k] for k in PEER_KINDS] + [np.array([self.checkpoint_bytes])]
        return torch.from_numpy(np.concatenate(parts).astype(np.float64))

    def drain(self) -> torch.Tensor:
        """:meth:`vector`, then reset the counts."""
        v = self.vector()
        self._reset()
        return v

    def decode(self, v: torch.Tensor | np.ndarray | list[float]) -> StepTraffic:
        """A (summed) :meth:`vector` as a :class:`StepTraffic`."""
        v = np.asarray(v, dtype=np.float64)
        n = self.num_layers * 4
        peers = v[n : n + 2 * len(PEER_KINDS)].reshape(len(PEER_KINDS), 2)
        return StepTraffic(
            v[:n].reshape(self.num_layers, 2, 2),
            *[peers[i].copy() for i in range(len(PEER_KINDS))],
            checkpoint_bytes=float(v[-1]),
        )  # type: ignore[misc]  # one positional per peer kind
