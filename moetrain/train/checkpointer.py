"""One rank's side of checkpointing: save what this rank owns, fence, and load on resume.

Owns: :class:`RankCheckpointer`, held by a :class:`~moetrain.train.trainer.RankTrainer`, which
hands it the parts it saves (:class:`~moetrain.train.state.RankParts`: model, optimizers, data
cursor, rank), the current step and placement, and the traffic counter its uploads go to
(nobody else sets its fields), and
:class:`ResumePoint`, the typed description of a committed checkpoint that the driver and every
rank resume from. What goes into which object is :mod:`moetrain.train.state`; how bytes reach the
store is :mod:`moetrain.checkpoint`. The driver-side commit lives in ``cluster.checkpointing``.

Protocol of one checkpoint on a rank::

    started = trainer.checkpointer.save(step)   # overlapped snapshot, streaming in the background
    ...                                          # training continues; the next optimizer.step()
                                                 # (and any expert migration) waits on fence()
    result = trainer.checkpointer.result()       # SaveResult for the driver's commit
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moetrain.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointError,
    CheckpointFuture,
    SaveResult,
    load_objects,
    read_manifest,
    resolve,
)
from moetrain.config import CheckpointConfig, RunConfig, StoreConfig, field_value
from moetrain.parallel.traffic import TrafficCounter
from moetrain.train.state import RankParts, load_rank_objects, rank_objects
from placement.placement import Placement


@dataclass(frozen=True)
class ResumePoint:
    """A committed checkpoint: where it is, the step and data cursor it ends at, the placement
    and group size that wrote it. Read from its validated manifest."""

    uri: str  # .../<run>/step-<N>
    step: int
    cursor: dict  # BatchCursor.state_dict() after ``step`` steps
    placement: Placement
    world_size: int
    config: dict = field(default_factory=dict, compare=False, repr=False)  # the writer's RunConfig
    run_id: str = ""  # the lineage that wrote it ("" for checkpoints from before run ids)
    # Where the objects come from instead of the store (an elastic resize hands over a step's
    # objects in memory): object names -> {name: object}. None = read them from ``uri``.
    fetch: Callable[[list[str]], dict[str, dict]] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def read(
        cls, cfg: CheckpointConfig, uri_or_latest: str, *, run: str | None = None, store_cfg: StoreConfig | None = None
    ) -> "ResumePoint":
        """``uri_or_latest``: a ``step-<N>`` URI, a run URI, or ``latest`` (of ``run`` under
        ``cfg.uri``). Raises :class:`CheckpointError` when nothing committed is there."""
        ref = resolve(uri_or_latest, cfg, run=run, store_cfg=store_cfg)
        manifest = read_manifest(ref)
        meta = manifest.meta
        return cls(
            uri=ref.uri,
            step=manifest.step,
            cursor=dict(meta["cursor"]),
            placement=Placement.from_json(meta["placement"]),
            world_size=manifest.world_size,
            config=dict(meta.get("config") or {}),
            run_id=str(meta.get("run_id", "")),
        )

    def check_compatible(self, cfg: RunConfig) -> None:
        """Raise :class:`CheckpointError` naming every shape-defining field in which ``cfg``
        differs from the config that wrote this checkpoint."""
        bad = shape_mismatches(self.config, cfg)
        if bad:
            raise CheckpointError(
                f"cannot resume from {self.uri}: the model differs from the checkpoint's ({'; '.join(bad)})"
            )


# Fields that fix the shape of a saved tensor: a checkpoint loads only into a model that agrees.
SHAPE_FIELDS = (
    "model.dim",
    "model.n_layers",
    "model.n_heads",
    "model.ffn_dim",
    "model.vocab_size",
    "model.tie_embeddings",
    "model.moe.num_experts",
    "model.moe.expert_ffn_dim",
    "model.moe.every_n_layers",
    "model.moe.first_moe_layer",
    "model.moe.num_shared_experts",
    "model.n_kv_heads",
    "model.qk_norm",
    "model.qkv_bias",
    "model.moe.shared_expert_ffn_dim",
    "model.moe.shared_expert_gate",
    "data.vocab_size",
)


def shape_mismatches(saved: dict, cfg: RunConfig) -> list[str]:
    """``field: X in the checkpoint, Y here`` for each :data:`SHAPE_FIELDS` entry that differs
    (``saved``: the checkpoint's config as a dict)."""
    out = []
    for path in SHAPE_FIELDS:
        node: object = saved
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        here = field_value(cfg, path)
        if path == "model.vocab_size" and 0 in (node, here):
            continue  # 0 = the tokenizer's size, which data.vocab_size fixes
        if node is not None and node != here:
            out.append(f"{path}: {node!r} in the checkpoint, {here!r} here")
    return out


@dataclass(frozen=True)
class SaveStarted:
    """What :meth:`RankCheckpointer.save` reports at once: the stall it cost, the position the
    checkpoint captures (identical on every rank), and an error if it could not even start."""

    step: int
    cursor: dict
    stall_s: float
    error: str = ""  # "" = the upload is under way


def first_nonfinite(tree, path: str = "") -> str:
    """The path (``object/key/...``) of the first floating tensor holding NaN or inf, or ""."""
    if torch.is_tensor(tree):
        return path if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else ""
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = first_nonfinite(value, f"{path}/{key}" if path else str(key))
            if found:
                return found
    return ""


class RankCheckpointer:
    """Saves and loads one rank's share of a checkpoint (see the module doc).

    parts: what the checkpoint holds. step, placement: the trainer's current step and placement
    (both change as the run goes on). traffic: where the bytes of finished uploads are counted.
    cfg, storage, run_name: the checkpoint settings, the object store and the run folder
    checkpoints go to."""

    def __init__(
        self,
        parts: RankParts,
        *,
        step: Callable[[], int],
        placement: Callable[[], Placement],
        traffic: TrafficCounter,
        cfg: CheckpointConfig,
        storage: StoreConfig,
        run_name: str,
    ) -> None:
        self._parts = parts
        self._step, self._placement = step, placement
        self._traffic = traffic
        self._cfg, self._storage, self._run_name = cfg, storage, run_name
        self._writer: AsyncCheckpointWriter | None = None
        self._future: CheckpointFuture | None = None  # the checkpoint in flight
        self._error = ""  # why the last save() did not start
        self._counted: CheckpointFuture | None = None  # the future whose uploaded bytes went into the trainer's traffic

    # ---- saving ---------------------------------------------------------------------------------
    def _open_writer(self) -> AsyncCheckpointWriter:
        if self._writer is None:
            parts = self._parts
            # Overlapped snapshot: save() returns at once and the host copy runs beside the next
            # step's forward/backward; the fence makes the next optimizer.step() wait for it.
            self._writer = AsyncCheckpointWriter.from_config(
                self._cfg,
                self._run_name,
                rank=parts.rank,
                on_error="mark",
                snapshot_mode="overlap",
                store_cfg=self._storage,
            )
            self._writer.install_fence(parts.optimizer)
            if parts.dense_zero is not None:  # ZeRO updates the dense weights in its own step
                self._writer.install_fence(parts.dense_zero.base_optimizer)
        return self._writer

    def objects(self, *, with_dense: bool | None = None, replicas: bool = False) -> dict[str, dict]:
        """The objects this rank writes for a checkpoint now (live tensors; a collective under
        ZeRO); ``with_dense`` / ``replicas`` as :func:`~moetrain.train.state.rank_objects`."""
        return rank_objects(self._parts, self._placement(), with_dense=with_dense, replicas=replicas)

    def save(self, step: int) -> SaveStarted:
        """Snapshot this rank's objects at ``step`` (must be the trainer's current step) and start
        streaming them. A store that cannot be opened is reported in the result, not raised."""
        if step != self._step():
            raise ValueError(f"checkpoint of step {step} asked for, but the trainer is at step {self._step()}")
        t0 = time.perf_counter()
        self._future, self._error = None, ""
        objects = self.objects()
        bad = first_nonfinite(objects)
        if bad:  # never stream, let alone commit, a checkpoint that holds NaN or inf
            self._error = f"NonFiniteCheckpoint: {bad} holds NaN or inf values at step {step}"
        else:
            try:
                self._future = self._open_writer().save(step, objects)
            except CheckpointError as exc:
                self._error = f"{type(exc).__name__}: {exc}"
        return SaveStarted(
            step=step, cursor=self._parts.cursor.state_dict(), stall_s=time.perf_counter() - t0, error=self._error
        )

    def result(self) -> SaveResult | str:
        """Block until the upload started by :meth:`save` is done: its :class:`SaveResult`, or an
        error string when it never started."""
        if self._future is None:
            return self._error or "no checkpoint started"
        res = self._future.result()
        if self._counted is not self._future and isinstance(res, SaveResult):
            self._counted = self._future
            self._traffic.add_checkpoint(res.bytes_written)  # in the next step's metrics
        return res

    def fence(self) -> None:
        """Wait until an overlapped snapshot no longer reads training's tensors (call before
        changing them outside ``optimizer.step()``, e.g. before migrating experts)."""
        if self._writer is not None:
            self._writer.fence()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ---- loading --------------------------------------------------------------------------------
    def load(self, point: ResumePoint) -> None:
        """Load dense state and exactly the experts this rank's placement hosts (weights and AdamW
        state) from ``point`` into the freshly built model and optimizers of its parts."""
        if point.fetch is not None:
            load_rank_objects(self._parts, self._placement(), point.fetch)
            return
        ref = resolve(point.uri, self._cfg, store_cfg=self._storage)
        manifest = read_manifest(ref)
        load_rank_objects(self._parts, self._placement(), lambda names: load_objects(ref, names, manifest=manifest))
