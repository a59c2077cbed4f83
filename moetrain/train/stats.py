"""Routing statistics gathered during training, without extra synchronisation per step.

Owns: per-step local counts — ``load_LE`` (tokens per expert per MoE layer), ``coact_LEE``
(pairs of experts chosen by the same token in the same layer; symmetric, zero diagonal) and
``trans_LEE`` (token chose e in MoE layer l and e' in layer l+1; [L-1, E, E]) — kept for a
moving window of steps, plus a bounded sample of raw per-token top-k ids. All-reduce happens
only when somebody asks (:meth:`RoutingStatsAccumulator.reduced`). The ``.npz`` it writes has the
same keys as the routing traces in ``shared/traces`` so ``placement`` reads both the same way.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import torch

from moetrain.parallel.context import ParallelContext


def _onehot_TE(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    a = torch.zeros(topk_ids_TK.shape[0], num_experts, device=topk_ids_TK.device)
    return a.scatter_(1, topk_ids_TK, 1.0)


def step_stats(routing_ids: list[torch.Tensor], num_experts: int) -> tuple[torch.Tensor, ...]:
    """(load_LE, coact_LEE, trans_LEE) of one batch, from each MoE layer's topk_ids_TK."""
    onehots = [_onehot_TE(ids, num_experts) for ids in routing_ids]
    load = torch.stack([a.sum(0) for a in onehots])
    coact = torch.stack([a.T @ a for a in onehots])
    coact.diagonal(dim1=1, dim2=2).zero_()
    L = len(onehots)
    trans = (torch.stack([onehots[i].T @ onehots[i + 1] for i in range(L - 1)]) if L > 1
             else torch.zeros(0, num_experts, num_experts, device=load.device))
    return load, coact, trans


class RoutingStatsAccumulator:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, window: int = 50,
                 sample_tokens: int = 8192):
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.window = max(1, window)
        self._steps: collections.deque = collections.deque(maxlen=self.window)
        self._current: list[torch.Tensor] | None = None
        self._sample: collections.deque = collections.deque()
        self._sample_tokens = 0
        self.sample_limit = sample_tokens

    @torch.no_grad()
    def add(self, routing: list) -> None:
        """Add one micro-batch's routing (list of RouterOutput, one per MoE layer)."""
        ids = [r.topk_ids_TK.detach() for r in routing]
        parts = step_stats(ids, self.E)
        if self._current is None:
            self._current = [p.clone() for p in parts]
        else:
            for acc, p in zip(self._current, parts):
                acc += p
        ids_TLK = torch.stack(ids, dim=1).to(torch.int16).cpu().numpy()
        self._sample.append(ids_TLK)
        self._sample_tokens += ids_TLK.shape[0]
        while self._sample and self._sample_tokens - self._sample[0].shape[0] >= self.sample_limit:
            self._sample_tokens -= self._sample.popleft().shape[0]

    def end_step(self) -> None:
        if self._current is not None:
            self._steps.append(self._current)
            self._current = None

    def local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sums over the window on this rank (zeros when empty)."""
        if not self._steps:
            z = torch.zeros
            return (z(self.L, self.E), z(self.L, self.E, self.E), z(max(self.L - 1, 0), self.E, self.E))
        return tuple(torch.stack([s[i] for s in self._steps]).sum(0) for i in range(3))

    def reduced(self, ctx: ParallelContext) -> dict[str, np.ndarray]:
        """Window sums all-reduced over ranks (one collective): load_LE, coact_LEE, trans_LEE."""
        load, coact, trans = self.local()
        flat = torch.cat([load.reshape(-1), coact.reshape(-1), trans.reshape(-1)]).to(ctx.device)
        ctx.all_reduce_sum(flat)
        flat = flat.cpu().numpy()
        n1, n2 = load.numel(), coact.numel()
        return {"load_LE": flat[:n1].reshape(load.shape), "coact_LEE": flat[n1:n1 + n2].reshape(coact.shape),
                "trans_LEE": flat[n1 + n2:].reshape(trans.shape)}

    def sample_ids(self) -> np.ndarray:
        """Recent per-token top-k ids of this rank, int16 [T, L, K]."""
        if not self._sample:
            return np.zeros((0, self.L, self.K), dtype=np.int16)
        return np.concatenate(list(self._sample))


def save_routing_npz(path: str, stats: dict[str, np.ndarray], topk_ids_TLK: np.ndarray, num_experts: int,
                     top_k: int, extra_meta: dict | None = None) -> None:
    """Write statistics in the trace format (``topk_ids``, ``meta``) plus the aggregates."""
    meta = {"model": "moetrain", "num_experts": num_experts, "k": top_k, **(extra_meta or {})}
    np.savez_compressed(path, topk_ids=topk_ids_TLK.astype(np.int16), meta=json.dumps(meta),
                        layers_present=np.arange(topk_ids_TLK.shape[1]), **stats)
