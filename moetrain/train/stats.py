"""Routing statistics gathered during training, without a host synchronisation per step.

Owns: per-step local counts — ``load_LE`` (tokens per expert per MoE layer), ``coact_LEE``
(pairs of experts chosen by the same token in the same layer; symmetric, zero diagonal) and
``trans_LEE`` (token chose e in MoE layer l and e' in layer l+1; [L-1, E, E]) — and a sample of raw
per-token top-k ids, all kept for a moving window of the last ``window`` optimizer steps. The
sample keeps the most recent tokens of the window, at most ``sample_tokens`` per rank. Everything stays on the
training device: the counts are summed there per micro-batch (``load_LE`` is the step's shared
per-expert count, ``moetrain.losses.routing_counts``, the load balancer's too), and the id sample
keeps device slices of the newest ``sample_tokens`` tokens only. Nothing is read to the host and
nothing is all-reduced until somebody asks (:meth:`RoutingStatsAccumulator.window_stats`), which
copies the window once and returns the placement library's own
:class:`~placement.stats.RoutingStats`: the solver sees exactly the window.
Every sampled token carries its **home rank** (``home_T``: the rank that routed it, i.e. this
rank), so the cost model scores its sends from where it really starts (placement/cost.py), and
its **step** (``step_T``: optimizer steps closed on this accumulator before it; the same on every
rank), so the validated selection splits the window by steps (placement/select.py).
Files of these statistics are written and read by ``placement.stats`` (``save_routing`` /
``load_routing``), the one owner of the ``.npz`` format.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import torch

from moetrain.parallel.context import ParallelContext
from placement.stats import RoutingStats


def _onehot_TE(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    a = torch.zeros(topk_ids_TK.shape[0], num_experts, device=topk_ids_TK.device)
    return a.scatter_(1, topk_ids_TK, 1.0)


def step_stats(
    routing_ids: list[torch.Tensor], num_experts: int, load_LE: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """(load_LE, coact_LEE, trans_LEE) of one batch, from each MoE layer's topk_ids_TK;
    ``load_LE`` when the caller already counted it (``moetrain.losses.routing_counts``)."""
    onehots = [_onehot_TE(ids, num_experts) for ids in routing_ids]
    load = torch.stack([a.sum(0) for a in onehots]) if load_LE is None else load_LE
    coact = torch.stack([a.T @ a for a in onehots])
    coact.diagonal(dim1=1, dim2=2).zero_()
    L = len(onehots)
    trans = (
        torch.stack([onehots[i].T @ onehots[i + 1] for i in range(L - 1)])
        if L > 1
        else torch.zeros(0, num_experts, num_experts, device=load.device)
    )
    return load, coact, trans


@dataclass
class _Step:
    counts: list[torch.Tensor]  # load_LE, coact_LEE, trans_LEE summed over the step's micro-batches
    ids: list[torch.Tensor]  # int16 [T_micro, L, K] per micro-batch (device), newest last; see add()
    index: int = 0  # optimizer steps closed on the accumulator before this one


class RoutingStatsAccumulator:
    """Moving window of routing statistics of one rank (see the module doc).

    ``window``: optimizer steps kept. ``sample_tokens``: at most this many of the window's most
    recent tokens keep their raw top-k ids on this rank (the exact cost model's input)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, window: int = 50, sample_tokens: int = 8192):
        if window < 1:
            raise ValueError(f"window ({window}) must be >= 1")
        if sample_tokens < 0:
            raise ValueError(f"sample_tokens ({sample_tokens}) must be >= 0")
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.window, self.sample_tokens = window, sample_tokens
        self._steps: collections.deque[_Step] = collections.deque(maxlen=window)
        self._current: _Step | None = None
        self._closed = 0  # optimizer steps closed so far (the index of the next one)

    @torch.no_grad()
    def add(self, routing: list, counts_LE: torch.Tensor | None = None) -> None:
        """Add one micro-batch's routing (list of RouterOutput, one per MoE layer) and, when the
        caller has them, its per-expert counts ``counts_LE`` (float32 [L, E]; not modified).
        No host read: the ids stay on their device."""
        ids = [r.topk_ids_TK.detach() for r in routing]
        parts = step_stats(ids, self.E, None if counts_LE is None else counts_LE.to(ids[0].device))
        if self._current is None:
            self._current = _Step([p.clone() for p in parts], [], self._closed)
        else:
            for acc, p in zip(self._current.counts, parts):
                acc += p
        if self.sample_tokens:
            ids_TLK = torch.stack(ids, dim=1)[-self.sample_tokens :].to(torch.int16)
            self._current.ids.append(ids_TLK)
            self._drop_old_ids([self._current])

    def _drop_old_ids(self, steps: list[_Step]) -> None:
        """Forget the id blocks of ``steps`` (newest first) that lie entirely beyond their newest
        ``sample_tokens`` tokens: the sample never reaches them (steps leave the window oldest
        first), so the device holds at most about twice ``sample_tokens`` plus one micro-batch.
        Sizes are shapes: no host read."""
        kept = 0
        for step in steps:
            for i in range(len(step.ids) - 1, -1, -1):
                if kept >= self.sample_tokens:
                    del step.ids[: i + 1]
                    break
                kept += step.ids[i].shape[0]

    def end_step(self) -> None:
        """Close the optimizer step: it enters the window (the oldest step leaves a full one)."""
        if self._current is not None:
            self._steps.append(self._current)
            self._current = None
            self._closed += 1
            self._drop_old_ids(list(reversed(self._steps)))

    def local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(load_LE, coact_LEE, trans_LEE) summed over the window on this rank (zeros if empty)."""
        if not self._steps:
            z = torch.zeros
            return (z(self.L, self.E), z(self.L, self.E, self.E), z(max(self.L - 1, 0), self.E, self.E))
        load, coact, trans = (torch.stack([s.counts[i] for s in self._steps]).sum(0) for i in range(3))
        return load, coact, trans

    def sample_ids(self) -> np.ndarray:
        """This rank's most recent ``sample_tokens`` top-k ids within the window, int16 [T, L, K]
        (oldest first); the one copy of the sample to the host."""
        return self.sample()[0]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sample_ids` and the step index of each row, int64 [T] (non-decreasing)."""
        parts, steps, kept = [], [], 0
        for step in reversed(self._steps):
            for ids in reversed(step.ids):
                if kept >= self.sample_tokens:
                    break
                take = min(ids.shape[0], self.sample_tokens - kept)
                parts.append(ids[ids.shape[0] - take :])
                steps.append(np.full(take, step.index, dtype=np.int64))
                kept += take
        if not parts:
            return np.zeros((0, self.L, self.K), dtype=np.int16), np.zeros(0, dtype=np.int64)
        return torch.cat(parts[::-1]).cpu().numpy(), np.concatenate(steps[::-1])

    def window_stats(self, ctx: ParallelContext) -> RoutingStats:
        """The window's counts all-reduced over ranks (one collective; the same on every rank)
        with this rank's id sample, whose home rank is ``ctx.rank``. The driver concatenates the
        ranks' samples."""
        load, coact, trans = self.local()
        flat = torch.cat([load.reshape(-1), coact.reshape(-1), trans.reshape(-1)]).to(ctx.device)
        ctx.all_reduce_sum(flat)
        flat_np = flat.cpu().double().numpy()
        n1, n2 = load.numel(), coact.numel()
        ids, steps = self.sample()
        return RoutingStats(
            self.E,
            self.K,
            flat_np[:n1].reshape(load.shape),
            flat_np[n1 : n1 + n2].reshape(coact.shape),
            flat_np[n1 + n2 :].reshape(trans.shape),
            ids.astype(np.int64),
            meta={"window_steps": len(self._steps)},
            home_T=np.full(ids.shape[0], ctx.rank, dtype=np.int64),
            step_T=steps,
        )


def merge_rank_samples(per_rank: list[RoutingStats]) -> RoutingStats:
    """One RoutingStats from every rank's :meth:`~RoutingStatsAccumulator.window_stats`: the
    (identical) reduced counts and all ranks' id samples with their home ranks, rank 0's first.
    Home ranks (steps) are kept only if every rank's sample has them."""
    first = per_rank[0]
    ids = np.concatenate([s.topk_ids_TLK for s in per_rank])
    homes = None
    if all(s.home_T is not None for s in per_rank):
        homes = np.concatenate([s.home_T for s in per_rank])
    steps = None
    if all(s.step_T is not None for s in per_rank):
        steps = np.concatenate([s.step_T for s in per_rank])
    return RoutingStats(
        first.num_experts,
        first.k,
        first.load_LE.copy(),
        first.coact_LEE.copy(),
        first.trans_LEE.copy(),
        ids,
        meta=dict(first.meta),
        home_T=homes,
        step_T=steps,
    )
