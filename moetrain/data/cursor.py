"""Which rows each optimizer step reads: the resumable data cursor and the batch layout.

Owns: :class:`BatchCursor` (global batches of row indices, reshuffled every epoch, with an
exact save / restore) and :func:`shard_global_batch` (a global batch -> one rank's micro-batches).

Shapes: ``B`` global batch rows, ``T1`` tokens per row (``seq_len + 1``), ``M`` micro-batches
per step, ``R`` ranks (world size), ``b`` = ``B / (M * R)`` rows per rank per micro-batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moetrain.data.errors import DataError

_STATE_VERSION = 1


class BatchCursor:
    """Successive global batches of row indices over ``num_rows`` rows.

    Epoch ``e`` visits rows in the order ``default_rng([seed, e]).permutation(num_rows)``,
    ``global_batch_size`` at a time; the last ``num_rows % global_batch_size`` rows of that
    order are skipped, so a batch never repeats a row and never spans two epochs.
    The state is ``(epoch, position)``: restoring it reproduces the remaining batches exactly.
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int) -> None:
        if global_batch_size < 1:
            raise DataError(f"global_batch_size ({global_batch_size}) must be >= 1")
        if num_rows < global_batch_size:
            raise DataError(
                f"num_rows ({num_rows}) must be >= global_batch_size ({global_batch_size}): "
                "the training split is too small for one batch"
            )
        if seed < 0:
            raise DataError(f"cursor seed ({seed}) must be >= 0")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next row to read
        self._order_N = epoch_order(seed, 0, num_rows)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    def next_indices(self) -> np.ndarray:
        """Row indices of the next global batch: int64 [global_batch_size]."""
        if self.position + self.global_batch_size > self.num_rows:
            self._start_epoch(self.epoch + 1)
        idx_B = self._order_N[self.position : self.position + self.global_batch_size].copy()
        self.position += self.global_batch_size
        return idx_B

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict; :meth:`load_state_dict` restores it exactly."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the dataset size and batch size must match this cursor's."""
        missing = [k for k in ("epoch", "position", "seed", "num_rows", "global_batch_size") if k not in state]
        if missing:
            raise DataError(f"cursor state is missing {missing}")
        for key in ("num_rows", "global_batch_size"):
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"cursor state has {key}={state[key]} but this cursor has "
                    f"{key}={getattr(self, key)}: the data or batch size changed"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_rows:
            raise DataError(
                f"cursor state epoch={epoch} position={position} is out of range (num_rows={self.num_rows})"
            )
        self.seed = int(state["seed"])
        self._start_epoch(epoch)
        self.position = position

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order_N = epoch_order(self.seed, epoch, self.num_rows)


def epoch_order(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    """The row visiting order of one epoch: a permutation of ``range(num_rows)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def shard_global_batch(tokens_BT1: np.ndarray, num_micro: int, world_size: int, rank: int) -> list[np.ndarray]:
    """One rank's micro-batches of a global batch: ``num_micro`` arrays of [b, T1].

    The global batch is viewed as [M, R, b, T1]; rank ``r`` gets ``[m, r]`` for each ``m``. So
    with ``world_size=1`` micro-batch ``m`` is the concatenation, in rank order, of every rank's
    micro-batch ``m`` at any world size: the distributed step sees the same tokens per micro-batch.
    """
    if num_micro < 1 or world_size < 1:
        raise DataError(f"num_micro ({num_micro}) and world_size ({world_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise DataError(f"rank ({rank}) must be in [0, world_size={world_size})")
    B = tokens_BT1.shape[0]
    if B % (num_micro * world_size):
        raise DataError(
            f"global batch size ({B}) must be divisible by num_micro x world_size "
            f"({num_micro} x {world_size} = {num_micro * world_size})"
        )
    b = B // (num_micro * world_size)
    x_MRbT1 = tokens_BT1.reshape(num_micro, world_size, b, *tokens_BT1.shape[1:])
    return [x_MRbT1[m, rank] for m in range(num_micro)]
