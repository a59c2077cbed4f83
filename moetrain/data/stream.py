"""Training on a prepared corpus, streamed: the mixture sampler, the exact cursor, the row reader.

Owns: :class:`StreamingData` (what a rank trains and validates on: domains, vocabulary, this
rank's micro-batches of each step, validation batches), its cursor :class:`StreamCursor`, and
:class:`RowReader` (rows by index, read as Parquet row groups through a bounded cache).

Which rows a step reads, the same on every rank and computed without reading any data:

1. Split: in each domain, row ``g`` (in manifest shard order) is a validation row when
   ``g % k == 0`` with ``k = round(1 / data.val_fraction)``; the others are training rows.
2. Mixture: ``data.mixture`` weights (default: training rows per domain) drive a smooth weighted
   round-robin over domains (integer state; every window of ``sum(weights)`` picks holds each
   domain exactly in proportion): the step's ``B`` picks say how many rows each domain gives.
3. Order within a domain: epoch ``e`` visits the domain's shards in a seeded permutation and each
   shard's training rows in a seeded permutation (so a step's rows of a domain sit in one or two
   shards); a domain that runs out starts its next epoch on its own.
4. The step's rows are shuffled (seeded by the step) and laid out ``[M, R, b]`` as
   :func:`~moetrain.data.cursor.shard_global_batch` does; with ``data.rank_assignment=domain``
   they are then reordered inside each micro-batch (:mod:`moetrain.data.assign`).

A rank then reads only its own rows: the row groups (:data:`~moetrain.data.shards.ROW_GROUP_ROWS`
rows) that hold them, kept in an LRU cache of at most :data:`CACHE_BYTES`. The cursor state (step,
round-robin state, per-domain epoch and position: a few integers) restores the remaining batches
exactly, across shard and epoch boundaries.
"""

from __future__ import annotations

import collections
import zlib
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from moetrain.config import DataConfig, parse_mixture
from moetrain.data.errors import DataError
from moetrain.data.shards import ROW_GROUP_ROWS, PreparedManifest

CACHE_BYTES = 256 << 20  # decoded row groups kept per rank (LRU)
MIXTURE_SCALE = 1_000_000  # mixture weights become integers in [0, MIXTURE_SCALE] for the round-robin
_STATE_VERSION = 2


def val_stride(val_fraction: float) -> int:
    return max(2, int(round(1.0 / val_fraction)))


def train_to_global(t: np.ndarray, k: int) -> np.ndarray:
    """Training row index -> row index in the domain (row ``g`` is validation iff ``g % k == 0``)."""
    t = np.asarray(t, dtype=np.int64)
    return (t // (k - 1)) * k + 1 + t % (k - 1)


def num_val(n: int, k: int) -> int:
    return -(-n // k)


class DomainOrder:
    """The seeded visiting order of one domain's training rows, epoch by epoch."""

    def __init__(self, name: str, shard_rows: list[int], k: int, seed: int):
        starts = np.concatenate([[0], np.cumsum(shard_rows)]).astype(np.int64)
        # training rows before each shard start: g - (number of multiples of k below g)
        self.t_starts = starts - (-(-starts // k))
        self.sizes = np.diff(self.t_starts)
        self.num_train = int(self.t_starts[-1])
        self.key = [seed, zlib.crc32(name.encode("utf-8"))]
        self._epoch = -1

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm_S = np.random.default_rng(self.key + [epoch]).permutation(len(self.sizes))
            self._cum = np.concatenate([[0], np.cumsum(self.sizes[self._perm_S])])
            self._rows: dict[int, np.ndarray] = {}

    def _shard_rows(self, j: int) -> np.ndarray:
        if j not in self._rows:
            if len(self._rows) > 4:
                self._rows.clear()
            order = np.random.default_rng(self.key + [self._epoch, j]).permutation(int(self.sizes[j]))
            self._rows[j] = self.t_starts[j] + order
        return self._rows[j]

    def take(self, epoch: int, pos: int, count: int) -> tuple[np.ndarray, int, int]:
        """``count`` training row indices from (epoch, pos); returns them and the new (epoch, pos)."""
        out = []
        while count > 0:
            if pos >= self.num_train:
                epoch, pos = epoch + 1, 0
            self._load_epoch(epoch)
            i = int(np.searchsorted(self._cum, pos, side="right")) - 1
            j = int(self._perm_S[i])
            lo = pos - int(self._cum[i])
            n = min(count, int(self.sizes[j]) - lo)
            out.append(self._shard_rows(j)[lo : lo + n])
            pos, count = pos + n, count - n
        return (np.concatenate(out) if out else np.zeros(0, np.int64)), epoch, pos


class StreamCursor:
    """Global batches as (domain index, training row index) pairs; exact save / restore."""

    def __init__(self, orders: list[DomainOrder], weights_D: np.ndarray, global_batch_size: int, seed: int):
        self.orders, self.B, self.seed = orders, global_batch_size, seed
        self.w_D = weights_D.astype(np.int64)
        self.step = 0
        self.cw_D = np.zeros(len(orders), dtype=np.int64)
        self.epoch_D = np.zeros(len(orders), dtype=np.int64)
        self.pos_D = np.zeros(len(orders), dtype=np.int64)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next global batch in shuffled order: (domain_B int64, train row t_B int64)."""
        total = int(self.w_D.sum())
        picks = np.empty(self.B, dtype=np.int64)
        for i in range(self.B):  # smooth weighted round-robin
            self.cw_D += self.w_D
            d = int(np.argmax(self.cw_D))
            self.cw_D[d] -= total
            picks[i] = d
        dom, rows = [], []
        for d in range(len(self.orders)):
            c = int(np.count_nonzero(picks == d))
            if c:
                t, e, p = self.orders[d].take(int(self.epoch_D[d]), int(self.pos_D[d]), c)
                self.epoch_D[d], self.pos_D[d] = e, p
                dom.append(np.full(c, d, dtype=np.int64))
                rows.append(t)
        dom_B, t_B = np.concatenate(dom), np.concatenate(rows)
        perm = np.random.default_rng([self.seed, self.step, 0x5EED]).permutation(self.B)
        self.step += 1
        return dom_B[perm], t_B[perm]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "kind": "prepared",
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.B,
            "weights": self.w_D.tolist(),
            "cw": self.cw_D.tolist(),
            "epoch": self.epoch_D.tolist(),
            "position": self.pos_D.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "prepared":
            raise DataError(
                "cursor state is not a prepared-data cursor (the checkpoint predates streaming "
                "data or used another data source)"
            )
        for key, mine in (("global_batch_size", self.B), ("weights", self.w_D.tolist())):
            if state.get(key) != mine:
                raise DataError(
                    f"cursor state has {key}={state.get(key)} but this run has {mine}: the data, "
                    "mixture or batch size changed"
                )
        n = len(self.orders)
        if not all(len(state[k]) == n for k in ("cw", "epoch", "position")):
            raise DataError(f"cursor state is for {len(state['cw'])} domains, this run has {n}")
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.cw_D = np.array(state["cw"], dtype=np.int64)
        self.epoch_D = np.array(state["epoch"], dtype=np.int64)
        self.pos_D = np.array(state["position"], dtype=np.int64)


class RowReader:
    """Rows of a prepared corpus by (domain, row index), read as row groups through an LRU cache."""

    def __init__(self, store, manifest: PreparedManifest, cache_bytes: int = CACHE_BYTES):
        self.store, self.cache_bytes = store, cache_bytes
        self.T1 = manifest.seq_len + 1
        self.keys: list[list[str]] = []
        self.starts: list[np.ndarray] = []
        for d in manifest.domains:
            shards = [s for s in manifest.shards if s.domain == d]
            self.keys.append([s.key for s in shards])
            self.starts.append(np.concatenate([[0], np.cumsum([s.rows for s in shards])]).astype(np.int64))
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cached_bytes = 0
        self.groups_read = 0

    def num_rows(self, d: int) -> int:
        return int(self.starts[d][-1])

    def read(self, dom_N: np.ndarray, g_N: np.ndarray) -> np.ndarray:
        """int32 [N, T1]: row ``g_N[i]`` of domain ``dom_N[i]``."""
        out = np.empty((len(g_N), self.T1), dtype=np.int32)
        for i, (d, g) in enumerate(zip(dom_N.tolist(), g_N.tolist())):
            j = int(np.searchsorted(self.starts[d], g, side="right")) - 1
            local = g - int(self.starts[d][j])
            group = self._group(d, j, local // ROW_GROUP_ROWS)
            out[i] = group[local % ROW_GROUP_ROWS]
        return out

    def _group(self, d: int, j: int, rg: int) -> np.ndarray:
        key = (d, j, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        shard = self.keys[d][j]
        try:
            with self.store.fs.open_input_file(self.store.path(shard)) as f:
                col = pq.ParquetFile(f).read_row_group(rg, columns=["tokens"]).column(0).combine_chunks()
        except Exception as exc:  # pyarrow raises OSError / ArrowInvalid; name the shard either way
            raise DataError(f"shard {self.store.uri_of(shard)} row group {rg} cannot be read: {exc}") from None
        rows = col.flatten().to_numpy().astype(np.int32, copy=False).reshape(-1, self.T1)
        self.groups_read += 1
        self._cache[key] = rows
        self._cached_bytes += rows.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return rows


def mixture_weights(cfg: DataConfig, domains: tuple[str, ...], train_rows_D: np.ndarray) -> np.ndarray:
    """Integer round-robin weights per domain from ``data.mixture`` (default: training rows)."""
    given = parse_mixture(cfg.mixture)
    unknown = sorted(set(given) - set(domains))
    if unknown:
        raise DataError(
            f"data.mixture names domain(s) {unknown} that the data does not have; its domains are {list(domains)}"
        )
    w = np.array([given.get(d, 0.0) for d in domains] if given else train_rows_D, dtype=np.float64)
    for d, weight in zip(domains, w):
        if weight > 0 and train_rows_D[domains.index(d)] == 0:
            raise DataError(f"data.mixture gives domain {d!r} weight {weight:g} but it has no training rows")
    return np.round(w / w.max() * MIXTURE_SCALE).astype(np.int64)
