"""Routing statistics: what the placement solvers learn from.

Owns: :class:`RoutingStats` (per-layer expert load, same-token co-activation, layer-to-layer
transitions, optionally the raw per-token top-k ids), building it from top-k ids, the one loader
for both the shared trace files and moetrain's own statistics files (``load_routing``), the one
writer of that format (``save_routing``, which moetrain's training uses too), and the fit /
held-out token split. Pure numpy.

Legend: T tokens, L MoE layers (those present in the statistics), K experts chosen per token,
E logical experts per layer.

- ``topk_ids_TLK`` int: expert chosen by token t in layer l as its k-th choice; -1 = missing
  (layer not logged, or the token skipped it).
- ``load_LE[l, e]``: tokens that chose e in layer l.
- ``coact_LEE[l, e, f]``: tokens that chose both e and f in layer l (symmetric, zero diagonal).
- ``home_T[t]`` int (optional, needs ``topk_ids``): token t's home rank, the data-parallel rank
  that routed it. With it the cost model scores sends from each token's own rank (cost.py);
  without it (traces, older files) a token's origin is the topology's ``origin_R``, as before.
- ``step_T[t]`` int (optional, needs ``topk_ids``): when token t was routed (the optimizer step in
  training, the forward pass in a trace), non-decreasing in time. The time split of the validated
  selection (select.py) cuts at step boundaries with it; without it, row order is time order.
- ``trans_LEE[l, e, f]``: tokens that chose e in layer l and f in layer l + 1, shape [L-1, E, E];
  "layer l + 1" means the next layer *present* in the statistics (for the Qwen trace that is
  0 -> 8 -> 12 -> 18 -> 23, see ``layer_ids``). Not symmetric.

File format (``.npz``, ``allow_pickle=False``): ``topk_ids`` int16 [T, L, K], ``meta`` a JSON
string with at least ``num_experts`` and ``k``; optional ``layers_present`` (trace files: only
those layers are kept; without it, and without ``layer_ids``, the layers holding at least one
expert id are kept: a layer of only -1 was not logged) and optional ``load_LE`` / ``coact_LEE`` /
``trans_LEE`` (moetrain's files:
aggregates accumulated over more steps than the ``topk_ids`` sample; they win when present) and
optional ``home_rank`` int16 [T] (the home rank of each ``topk_ids`` row) and ``step`` int64 [T]
(``step_T``; a trace's ``forward_idx`` is read as it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class StatsError(ValueError):
    """Invalid routing statistics (the message names the array / field and the bad value)."""


def _freeze(a: np.ndarray | None) -> np.ndarray | None:
    if a is not None:
        a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """Per-layer routing statistics of one model. Build with :func:`from_topk_ids`,
    :func:`from_aggregates` or :func:`load_routing`; the constructor validates everything."""

    num_experts: int
    k: int
    load_LE: np.ndarray  # float64 [L, E]
    coact_LEE: np.ndarray  # float64 [L, E, E]
    trans_LEE: np.ndarray  # float64 [max(L-1, 0), E, E]
    topk_ids_TLK: np.ndarray | None = None  # int64 [T, L, K], -1 missing
    layer_ids: tuple[int, ...] = field(default=())  # model layer index of each stats layer
    meta: dict = field(default_factory=dict)
    home_T: np.ndarray | None = None  # int64 [T] home rank of each topk_ids row (None: unknown)
    step_T: np.ndarray | None = None  # int64 [T] step (time) of each topk_ids row (None: row order)

    def __post_init__(self) -> None:
        E, k = int(self.num_experts), int(self.k)
        if E < 1:
            raise StatsError(f"num_experts must be >= 1, got {E}")
        if not 1 <= k <= E:
            raise StatsError(f"k must be in [1, num_experts={E}], got {k}")
        load = _as_counts("load_LE", self.load_LE, 2)
        L = load.shape[0]
        if load.shape[1] != E:
            raise StatsError(f"load_LE has {load.shape[1]} experts, num_experts is {E}")
        coact = _as_counts("coact_LEE", self.coact_LEE, 3)
        if coact.shape != (L, E, E):
            raise StatsError(f"coact_LEE has shape {coact.shape}, expected {(L, E, E)}")
        if not np.allclose(coact, coact.transpose(0, 2, 1)):
            raise StatsError("coact_LEE must be symmetric in its two expert axes")
        if np.any(coact[:, np.arange(E), np.arange(E)] != 0):
            raise StatsError("coact_LEE must have a zero diagonal (an expert is not co-activated with itself)")
        trans = _as_counts("trans_LEE", self.trans_LEE, 3)
        if trans.shape != (max(L - 1, 0), E, E):
            raise StatsError(f"trans_LEE has shape {trans.shape}, expected {(max(L - 1, 0), E, E)}")
        ids = None
        if self.topk_ids_TLK is not None:
            ids = _check_ids(self.topk_ids_TLK, E)
            if ids.shape[1] != L:
                raise StatsError(f"topk_ids has {ids.shape[1]} layers but load_LE has {L}")
        home = _check_home(self.home_T, ids)
        step = _check_step(self.step_T, ids)
        layer_ids = tuple(int(i) for i in self.layer_ids) or tuple(range(L))
        if len(layer_ids) != L:
            raise StatsError(f"layer_ids has {len(layer_ids)} entries for {L} layers")
        for name, val in [
            ("num_experts", E),
            ("k", k),
            ("load_LE", _freeze(load)),
            ("coact_LEE", _freeze(coact)),
            ("trans_LEE", _freeze(trans)),
            ("topk_ids_TLK", _freeze(ids)),
            ("layer_ids", layer_ids),
            ("home_T", _freeze(home)),
            ("step_T", _freeze(step)),
        ]:
            object.__setattr__(self, name, val)

    @property
    def num_layers(self) -> int:
        return self.load_LE.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens behind the statistics: rows of ``topk_ids`` if present, else the largest
        per-layer ``load.sum() / k``."""
        if self.topk_ids_TLK is not None:
            return int(self.topk_ids_TLK.shape[0])
        return int(round(float(self.load_LE.sum(axis=1).max(initial=0.0)) / self.k))

    @cached_property
    def tokens_L(self) -> np.ndarray:
        """Tokens behind each layer, int [L]: the ``topk_ids`` rows holding an id in it (a trace
        whose rows each log one layer has fewer than T), or ``load.sum() / k`` from aggregates."""
        if self.topk_ids_TLK is not None:
            return (self.topk_ids_TLK >= 0).any(axis=2).sum(axis=0).astype(np.int64)
        return np.round(self.load_LE.sum(axis=1) / self.k).astype(np.int64)

    @property
    def num_home_ranks(self) -> int:
        """1 + the largest home rank (0 without home ranks)."""
        return 0 if self.home_T is None or not self.home_T.size else int(self.home_T.max()) + 1

    def layer(self, l: int) -> "RoutingStats":
        """The statistics of layer ``l`` alone (a one-layer RoutingStats)."""
        return self.select_layers([l])

    def select_layers(self, layers: Sequence[int]) -> "RoutingStats":
        """Keep ``layers`` (indices into this object's layers, ascending and unique)."""
        idx = [int(i) for i in layers]
        if sorted(set(idx)) != idx or (idx and not 0 <= idx[0] <= idx[-1] < self.num_layers):
            raise StatsError(f"layers {idx} must be ascending, unique and in [0, {self.num_layers})")
        E = self.num_experts
        trans = np.zeros((max(len(idx) - 1, 0), E, E))
        for j, (a, b) in enumerate(zip(idx[:-1], idx[1:])):
            if b == a + 1:
                trans[j] = self.trans_LEE[a]
            elif self.topk_ids_TLK is not None:
                trans[j] = _pair_counts(self.topk_ids_TLK[:, a], self.topk_ids_TLK[:, b], E)
        ids = None if self.topk_ids_TLK is None else self.topk_ids_TLK[:, idx]
        return RoutingStats(
            E,
            self.k,
            self.load_LE[idx],
            self.coact_LEE[idx],
            trans,
            ids,
            tuple(self.layer_ids[i] for i in idx),
            dict(self.meta),
            self.home_T,
            self.step_T,
        )

    def take_rows(self, rows: Sequence[int] | np.ndarray) -> "RoutingStats":
        """The statistics of the ``topk_ids`` rows ``rows`` alone (recounted from their ids, home
        ranks and steps kept; a row may repeat: bootstrap resamples)."""
        if self.topk_ids_TLK is None:
            raise StatsError("take_rows needs per-token topk_ids; these statistics hold aggregates only")
        idx = np.asarray(rows, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return from_topk_ids(
            self.topk_ids_TLK[idx], self.num_experts, self.layer_ids, self.meta, pick(self.home_T), pick(self.step_T)
        )

    def save(self, path: str | Path, extra_meta: dict | None = None) -> None:
        """Write the ``.npz`` format described in the module docstring (:func:`save_routing`)."""
        save_routing(path, self, extra_meta)


def save_routing(path: str | Path, stats: RoutingStats, extra_meta: dict | None = None) -> None:
    """The one writer of the ``.npz`` format described in the module docstring (its reader is
    :func:`load_routing`): the id sample (``topk_ids``, with ``home_rank`` and ``step`` when
    known), ``layers_present`` and ``layer_ids``, and the aggregates, which the reader prefers
    over the sample. ``meta`` is ``stats.meta`` plus ``extra_meta``, with ``num_experts`` and ``k``."""
    ids = stats.topk_ids_TLK
    if ids is None:
        ids = np.zeros((0, stats.num_layers, stats.k), dtype=np.int16)
    if ids.size and ids.max() > np.iinfo(np.int16).max:
        raise StatsError(f"expert ids up to {ids.max()} do not fit the int16 topk_ids format")
    meta = dict(stats.meta, **(extra_meta or {}), num_experts=stats.num_experts, k=stats.k)
    extra: dict[str, Any] = {} if stats.home_T is None else {"home_rank": stats.home_T.astype(np.int16)}
    if stats.step_T is not None:
        extra["step"] = stats.step_T
    np.savez_compressed(
        path,
        topk_ids=ids.astype(np.int16),
        meta=np.array(json.dumps(meta)),
        layers_present=np.arange(stats.num_layers),
        layer_ids=np.asarray(stats.layer_ids, dtype=np.int64),
        load_LE=stats.load_LE,
        coact_LEE=stats.coact_LEE,
        trans_LEE=stats.trans_LEE,
        **extra,
    )


def _as_counts(name: str, a: np.ndarray, ndim: int) -> np.ndarray:
    arr = np.array(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise StatsError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise StatsError(f"{name} holds NaN or infinite counts")
    if arr.size and arr.min() < 0:
        raise StatsError(f"{name} holds negative counts (min {arr.min():g})")
    return arr


def _check_ids(topk_ids_TLK: np.ndarray, num_experts: int) -> np.ndarray:
    ids = np.array(topk_ids_TLK)
    if ids.ndim != 3:
        raise StatsError(f"topk_ids must be 3-D [tokens, layers, k], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise StatsError(f"topk_ids must hold integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < -1 or ids.max() >= num_experts):
        raise StatsError(
            f"topk_ids holds expert ids in [{ids.min()}, {ids.max()}], expected [0, {num_experts}) or -1 for missing"
        )
    srt = np.sort(ids, axis=2)
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if dup.any():
        t, l, _ = np.argwhere(dup)[0]
        raise StatsError(f"topk_ids: token {t} chose the same expert twice in layer {l}")
    return ids


def _check_rows(values: np.ndarray | None, ids_TLK: np.ndarray | None, name: str, what: str) -> np.ndarray | None:
    """``name`` ([T] int64, one ``what`` per topk_ids row), checked; None stays None."""
    if values is None:
        return None
    arr = np.array(values)
    if ids_TLK is None:
        raise StatsError(f"{name} needs per-token topk_ids (a {what} per topk_ids row)")
    if arr.ndim != 1 or arr.shape[0] != ids_TLK.shape[0]:
        raise StatsError(f"{name} has shape {arr.shape}, expected [{ids_TLK.shape[0]}] (one per topk_ids row)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise StatsError(f"{name} must hold integer {what}s, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_home(home_T: np.ndarray | None, ids_TLK: np.ndarray | None) -> np.ndarray | None:
    home = _check_rows(home_T, ids_TLK, "home_T", "rank")
    if home is not None and home.size and home.min() < 0:
        raise StatsError(f"home_T holds a negative rank ({home.min()})")
    return home


def _check_step(step_T: np.ndarray | None, ids_TLK: np.ndarray | None) -> np.ndarray | None:
    return _check_rows(step_T, ids_TLK, "step_T", "step")


def onehot_TE(ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """0/1 float matrix [T, E]: token t chose expert e (ids -1 ignored)."""
    T = ids_TK.shape[0]
    out = np.zeros((T, num_experts + 1))
    out[np.arange(T)[:, None], np.where(ids_TK >= 0, ids_TK, num_experts)] = 1.0
    return out[:, :num_experts]


def _pair_counts(a_TK: np.ndarray, b_TK: np.ndarray, num_experts: int) -> np.ndarray:
    return onehot_TE(a_TK, num_experts).T @ onehot_TE(b_TK, num_experts)


def from_topk_ids(
    topk_ids_TLK: np.ndarray,
    num_experts: int,
    layer_ids: Sequence[int] = (),
    meta: dict | None = None,
    home_T: np.ndarray | None = None,
    step_T: np.ndarray | None = None,
) -> RoutingStats:
    """Count load, co-activation and transitions from raw top-k ids [T, L, K] (-1 = missing);
    ``home_T`` / ``step_T`` [T]: optional home rank and step of each token."""
    ids = _check_ids(topk_ids_TLK, int(num_experts))
    T, L, K = ids.shape
    E = int(num_experts)
    load = np.zeros((L, E))
    coact = np.zeros((L, E, E))
    trans = np.zeros((max(L - 1, 0), E, E))
    prev = None
    for l in range(L):
        oh = onehot_TE(ids[:, l], E)
        load[l] = oh.sum(axis=0)
        coact[l] = oh.T @ oh
        np.fill_diagonal(coact[l], 0.0)
        if prev is not None:
            trans[l - 1] = prev.T @ oh
        prev = oh
    return RoutingStats(E, K, load, coact, trans, ids, tuple(layer_ids), dict(meta or {}), home_T, step_T)


def from_aggregates(
    load_LE: np.ndarray, coact_LEE: np.ndarray, k: int, trans_LEE: np.ndarray | None = None
) -> RoutingStats:
    """Statistics from aggregates only (no per-token ids: costs use the pairwise model)."""
    load = np.asarray(load_LE, dtype=np.float64)
    if load.ndim != 2:
        raise StatsError(f"load_LE must be 2-D [layers, experts], got shape {load.shape}")
    L, E = load.shape
    if trans_LEE is None:
        trans_LEE = np.zeros((max(L - 1, 0), E, E))
    return RoutingStats(E, int(k), load, np.asarray(coact_LEE, dtype=np.float64), trans_LEE)


def logged_layers(ids_TLK: np.ndarray, path: Path) -> list[int]:
    """The layers of a trace without ``layers_present``: those where some id is not -1 (a layer
    nobody logged holds only -1 and would otherwise be scored as a free, empty layer)."""
    present = [int(l) for l in np.flatnonzero((np.asarray(ids_TLK) >= 0).any(axis=(0, 2)))]
    if ids_TLK.shape[0] and not present:
        raise StatsError(f"{str(path)!r}: topk_ids holds no expert id in any layer (all -1)")
    return present if ids_TLK.shape[0] else list(range(ids_TLK.shape[1]))


def load_routing(path: str | Path) -> RoutingStats:
    """Read a trace file or a moetrain statistics file (format in the module docstring)."""
    p = Path(path)
    data = _read_npz(p)
    E, k, meta = _meta(data, p)
    ids = data["topk_ids"]
    if ids.ndim != 3 or ids.shape[2] != k:
        raise StatsError(f"{str(p)!r}: topk_ids has shape {ids.shape}, expected [tokens, layers, k={k}]")
    home, step = _row_arrays(data, ids, p)
    layers = _layers_kept(data, ids, p)
    if "load_LE" in data:
        return _with_aggregates(data, p, E, k, ids, meta, home, step)
    if layers is None:
        layers = [int(i) for i in data["layer_ids"]]
        return from_topk_ids(ids, E, layers, meta, home, step)
    return from_topk_ids(ids[:, layers], E, layers, meta, home, step)


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    """The arrays of the file, checked for ``topk_ids`` and ``meta``."""
    if not p.is_file():
        raise StatsError(f"routing statistics file {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {key: z[key] for key in z.files}
    except (OSError, ValueError) as exc:
        raise StatsError(f"{str(p)!r} is not a readable .npz file: {exc}") from None
    for key in ("topk_ids", "meta"):
        if key not in data:
            raise StatsError(f"{str(p)!r} lacks the array {key!r}")
    return data


def _meta(data: dict[str, np.ndarray], p: Path) -> tuple[int, int, dict]:
    """``(num_experts, k, meta)`` from the file's JSON ``meta``."""
    try:
        meta = json.loads(str(data["meta"]))
        return int(meta["num_experts"]), int(meta["k"]), meta
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StatsError(f"{str(p)!r}: meta must be a JSON object with num_experts and k ({exc})") from None


def _row_arrays(data: dict[str, np.ndarray], ids: np.ndarray, p: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The home rank and step of each ``topk_ids`` row (None where absent or empty; a step array
    of the wrong shape is dropped, a home array of the wrong shape is an error)."""
    home = data.get("home_rank")
    if home is not None and home.shape != (ids.shape[0],):
        raise StatsError(f"{str(p)!r}: home_rank has shape {home.shape}, expected [{ids.shape[0]}] (one per token)")
    if home is not None and not ids.shape[0]:
        home = None
    step = data.get("step", data.get("forward_idx"))
    if step is not None and (step.shape != (ids.shape[0],) or not ids.shape[0]):
        step = None
    return home, step


def _layers_kept(data: dict[str, np.ndarray], ids: np.ndarray, p: Path) -> list[int] | None:
    """``layers_present``, else None when the file names its ``layer_ids``, else the logged layers."""
    if "layers_present" in data:
        layers = [int(i) for i in np.asarray(data["layers_present"]).ravel()]
        if any(not 0 <= i < ids.shape[1] for i in layers):
            raise StatsError(f"{str(p)!r}: layers_present {layers} outside [0, {ids.shape[1]})")
        return layers
    if "layer_ids" in data:
        return None
    return logged_layers(ids, p)


def _with_aggregates(
    data: dict[str, np.ndarray],
    p: Path,
    E: int,
    k: int,
    ids: np.ndarray,
    meta: dict,
    home: np.ndarray | None,
    step: np.ndarray | None,
) -> RoutingStats:
    """A moetrain statistics file: its aggregates, with the id sample (if any) beside them."""
    ids_or_none = ids.astype(np.int64) if ids.shape[0] else None
    layer_ids = tuple(int(i) for i in data.get("layer_ids", np.arange(data["load_LE"].shape[0])))
    trans = data.get("trans_LEE")
    if trans is None:
        L = data["load_LE"].shape[0]
        trans = np.zeros((max(L - 1, 0), E, E))
    if "coact_LEE" not in data:
        raise StatsError(f"{str(p)!r} has load_LE but lacks coact_LEE")
    return RoutingStats(
        E,
        k,
        data["load_LE"],
        data["coact_LEE"],
        trans,
        ids_or_none,
        layer_ids,
        meta,
        home,
        step if ids_or_none is not None else None,
    )


def split_tokens(stats_or_ids: RoutingStats | np.ndarray, seed: int = 0, fraction: float = 0.5):
    """Random token split for the fit-on-one-part / score-on-the-other protocol.

    Returns ``(fit, held_out)``: two RoutingStats (recounted from their tokens) when given
    RoutingStats with ``topk_ids``, or two id arrays [T_fit, L, K], [T - T_fit, L, K] when given
    an array. ``fraction`` is the share of tokens in ``fit``.
    """
    if not 0.0 < fraction < 1.0:
        raise StatsError(f"fraction ({fraction}) must be in (0, 1)")
    if isinstance(stats_or_ids, RoutingStats):
        if stats_or_ids.topk_ids_TLK is None:
            raise StatsError("split_tokens needs per-token topk_ids; these statistics hold aggregates only")
        ids = stats_or_ids.topk_ids_TLK
    else:
        ids = np.asarray(stats_or_ids)
        if ids.ndim != 3:
            raise StatsError(f"topk_ids must be 3-D [tokens, layers, k], got shape {ids.shape}")
    T = ids.shape[0]
    if T < 2:
        raise StatsError(f"cannot split {T} token(s) into two parts")
    perm = np.random.default_rng(seed).permutation(T)
    n_fit = min(max(int(round(T * fraction)), 1), T - 1)
    a, b = np.sort(perm[:n_fit]), np.sort(perm[n_fit:])
    if isinstance(stats_or_ids, RoutingStats):
        return stats_or_ids.take_rows(a), stats_or_ids.take_rows(b)
    return ids[a], ids[b]


def with_ids_dropped(stats: RoutingStats) -> RoutingStats:
    """The same statistics without per-token ids (forces the pairwise cost model)."""
    return replace(stats, topk_ids_TLK=None, home_T=None, step_T=None)


def without_homes(stats: RoutingStats) -> RoutingStats:
    """The same statistics without home ranks: the domain-agnostic cost (uniform origin)."""
    return replace(stats, home_T=None)
