"""Which rank gets which row of a global batch: ``data.rank_assignment``.

Owns: :class:`DomainRankMap` (a stable domain -> rank map derived from the domains' token shares)
and :func:`assign_rows` (a permutation of one global batch that keeps every micro-batch's set of
rows and only changes which rank gets which row).

- ``shuffled`` (default): the global batch, in the cursor's shuffled order, is laid out as
  ``[M, R, b]`` (:func:`~moetrain.data.cursor.shard_global_batch`): every rank gets a random mix.
- ``domain``: inside each micro-batch the rows are reordered so that rank ``r``'s ``b`` rows are
  as domain-homogeneous as the mixture allows. The map lays the domains, in a fixed order, end to
  end on the interval ``[0, 1)`` with lengths equal to their token shares; rank ``r`` owns
  ``[r / R, (r + 1) / R)``, so domain ``d`` is homed on the ranks its segment overlaps
  (``share_DR``). Per micro-batch, the rows are stably sorted by their domain's position in that
  order and cut into ``R`` consecutive chunks of ``b`` rows: a rank holds one domain, or the two
  or more whose segments meet inside its interval. Batch-to-batch noise in the domain counts only
  moves the cut points.

Because each micro-batch keeps the same rows, the expert-parallel result with ``domain`` equals
the single-process result on the same global batch (tests/parallel/test_rank_assignment.py).

Shapes: ``B`` global batch rows, ``M`` micro-batches, ``R`` ranks, ``b = B / (M R)``, ``D`` domains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetrain.data.errors import DataError


@dataclass(frozen=True)
class DomainRankMap:
    """A stable domain -> rank map. ``share_DR[d, r]``: the fraction of rank ``r``'s rows that
    are expected to come from domain ``d`` (each column sums to 1)."""

    domains: tuple[str, ...]
    share_DR: np.ndarray  # float64 [D, R]
    order_D: np.ndarray  # int64 [D]: position of each domain on the line (0 = first)

    @property
    def num_ranks(self) -> int:
        return int(self.share_DR.shape[1])

    def home_ranks(self, domain: str) -> tuple[int, ...]:
        """The ranks domain ``domain`` is expected on, in rank order."""
        d = self.domains.index(domain)
        return tuple(int(r) for r in np.flatnonzero(self.share_DR[d] > 0))

    def rank_domains(self, rank: int) -> tuple[str, ...]:
        """The domains rank ``rank`` is expected to hold."""
        return tuple(self.domains[d] for d in np.flatnonzero(self.share_DR[:, rank] > 0))


def domain_rank_map(domains: tuple[str, ...] | list[str], shares_D, num_ranks: int) -> DomainRankMap:
    """The map for token shares ``shares_D`` (any non-negative weights; normalised here) on
    ``num_ranks`` ranks. Domains are laid out in the given order (the dataset's domain order, so
    the map is the same on every rank and across resumes)."""
    shares = np.asarray(shares_D, dtype=np.float64)
    if len(domains) != len(shares) or len(shares) == 0:
        raise DataError(f"domain_rank_map: {len(domains)} domain(s) but {len(shares)} share(s)")
    if num_ranks < 1:
        raise DataError(f"domain_rank_map: num_ranks ({num_ranks}) must be >= 1")
    if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
        raise DataError(f"domain_rank_map: shares {shares.tolist()} must be finite, >= 0, not all 0")
    bounds = np.concatenate([[0.0], np.cumsum(shares / shares.sum())])
    bounds[-1] = 1.0
    lo_R = np.arange(num_ranks) / num_ranks
    hi_R = (np.arange(num_ranks) + 1) / num_ranks
    overlap_DR = np.clip(
        np.minimum(bounds[1:, None], hi_R[None, :]) - np.maximum(bounds[:-1, None], lo_R[None, :]), 0.0, None
    )
    share_DR = overlap_DR * num_ranks
    share_DR[share_DR < 1e-12] = 0.0
    return DomainRankMap(domains=tuple(domains), share_DR=share_DR, order_D=np.arange(len(shares)))


def assign_rows(domain_B: np.ndarray, num_micro: int, world_size: int, dmap: DomainRankMap) -> np.ndarray:
    """Permutation ``perm_B`` (int64 [B]) of a global batch for ``domain`` assignment: laid out
    as ``[M, R, b]`` (``shard_global_batch``), ``batch[perm_B]`` gives rank ``r`` a domain-sorted
    chunk of micro-batch ``m``. Every micro-batch keeps exactly the rows it had
    (``perm_B[m*R*b:(m+1)*R*b]`` is a permutation of that range)."""
    B = len(domain_B)
    if B % (num_micro * world_size):
        raise DataError(
            f"global batch size ({B}) must be divisible by num_micro x world_size ({num_micro} x {world_size})"
        )
    if dmap.num_ranks != world_size:
        raise DataError(f"the domain -> rank map is for {dmap.num_ranks} ranks, the group has {world_size}")
    key_B = dmap.order_D[np.asarray(domain_B, dtype=np.int64)]
    per_micro = B // num_micro
    perm = [
        m * per_micro + np.argsort(key_B[m * per_micro : (m + 1) * per_micro], kind="stable") for m in range(num_micro)
    ]
    return np.concatenate(perm).astype(np.int64)
