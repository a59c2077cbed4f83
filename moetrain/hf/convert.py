"""Import an HF model directory as a moetrain checkpoint; what import and export share.

Owns: :func:`import_hf` (HF dir -> ``<out>/<run>/step-0``: ``dense.pt`` and one object per
expert, as training writes them, placement-independent, plus the tokenizer files as
``tokenizer/<file>`` objects; the manifest's meta carries the moetrain config and the original
``config.json`` and the :class:`SourceLayout`: the source's dtype per tensor and its shard sizes),
and the records both directions use: :class:`ConvertReport`, :class:`SourceLayout`,
:func:`expert_groups`. The way back is :mod:`moetrain.hf.export`.

Streaming: import reads one HF tensor at a time (ranged reads) and writes one MoE layer's
expert objects at a time, concurrently; only the dense parameters (one object) or one layer's
experts are held together. It goes through ``moetrain.storage``, so every path may be a local
directory or an ``s3://`` / ``gs://`` URI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moetrain.checkpoint import AsyncCheckpointWriter, commit
from moetrain.checkpoint.layout import CheckpointRef, ObjectEntry
from moetrain.checkpoint.root import open_root
from moetrain.config import ClusterConfig, DataConfig, ModelConfig, RunConfig, StoreConfig
from moetrain.hf.arch import ArchSpec, arch_of, check_special_ids, context_of, context_text, model_config_from_hf
from moetrain.hf.safetensors_io import CONFIG, GENERATION_CONFIG, TOKENIZER_FILES, HFDir, read_json
from moetrain.hf.tensors import TensorMap, tensor_plan, to_moetrain
from moetrain.model.transformer import count_moe_blocks
from moetrain.train.state import DENSE, expert_object_name
from placement.placement import Placement

log = logging.getLogger(__name__)
TOKENIZER_PREFIX = "tokenizer/"
# Objects written / read at once: one MoE layer's experts are in memory together (1/L of them)
# and stream on this many threads, so per-object latency (fsync, S3 requests) overlaps.
WRITE_CONCURRENCY = 8


@dataclass(frozen=True)
class ConvertReport:
    uri: str  # what was written: the checkpoint (step URI) or the HF directory
    tensors: int
    bytes: int  # tensor bytes moved
    files: int  # objects / shards written
    note: str = ""  # import: the context and its cap; export: dtype and shards


@dataclass(frozen=True)
class SourceLayout:
    """How the HF model a checkpoint came from was stored, recorded at import (manifest meta
    ``hf.layout``) so that an export can store it the same way."""

    dtype: str  # the dtype of most tensor bytes, e.g. "bfloat16"
    dtypes: dict[str, str]  # tensors stored in another dtype (e.g. an fp32 router bias), by HF name
    shard_bytes: int  # tensor bytes of the largest shard
    shards: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "dtypes": dict(self.dtypes),
            "shard_bytes": self.shard_bytes,
            "shards": self.shards,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "SourceLayout":
        return SourceLayout(
            str(d["dtype"]),
            {str(k): str(v) for k, v in (d.get("dtypes") or {}).items()},
            int(d["shard_bytes"]),
            int(d["shards"]),
        )


def source_layout(src: HFDir) -> SourceLayout:
    """The dtype (of most bytes) and the shard sizes of an HF directory, from its headers."""
    by_dtype: dict[torch.dtype, int] = {}
    by_shard: dict[str, int] = {}
    for info in src.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
        by_shard[info.shard] = by_shard.get(info.shard, 0) + info.nbytes
    main = max(by_dtype, key=lambda d: (by_dtype[d], str(d))) if by_dtype else torch.float32
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return SourceLayout(
        name(main),
        {n: name(i.dtype) for n, i in src.tensors.items() if i.dtype != main},
        max(by_shard.values(), default=0),
        max(1, len(by_shard)),
    )


def expert_groups(plan: list[TensorMap]) -> dict[tuple[int, int], list[TensorMap]]:
    """The expert tensors of ``plan`` by (MoE layer, expert): one checkpoint object each."""
    groups: dict[tuple[int, int], list[TensorMap]] = {}
    for m in plan:
        if m.kind_of_target == "expert":
            _, layer, e, _ = m.target.split(":")
            groups.setdefault((int(layer), int(e)), []).append(m)
    return groups


def _read_target(src: HFDir, m: TensorMap, spec: ArchSpec) -> torch.Tensor:
    return to_moetrain(m, [src.read(s) for s in m.sources], interleaved_rope=spec.interleaved_rope)


def run_meta(
    model: ModelConfig, hf_config: dict, source: str, tokenizer_files: list[str], layout: SourceLayout | None = None
) -> dict[str, Any]:
    """Manifest meta of an imported checkpoint: resumable fields plus the HF config."""
    run_cfg = RunConfig(
        model=model,
        cluster=ClusterConfig(num_workers=1),
        data=DataConfig(tokenizer=f"hf:{source}" if "tokenizer.json" in tokenizer_files else "bpe"),
    )
    placement = Placement.contiguous(count_moe_blocks(model), model.moe.num_experts, 1)
    return {
        "step": 0,
        "run_id": "",
        "cursor": {},
        "placement": placement.to_json(),
        "config": run_cfg.to_dict(),
        "hf": {
            "config": hf_config,
            "source": source,
            "tokenizer_files": tokenizer_files,
            **({"layout": layout.to_dict()} if layout else {}),
        },
    }


def import_hf(src_uri: str, out_uri: str, run: str = "hf", *, store_cfg: StoreConfig | None = None) -> ConvertReport:
    """HF directory ``src_uri`` -> committed checkpoint ``<out_uri>/<run>/step-0`` (both stores
    opened with ``store_cfg``'s endpoints)."""
    src = HFDir(src_uri, store_cfg)
    spec = arch_of(src.config, src.store.uri_of(CONFIG))
    model = model_config_from_hf(src.config, where=src.store.uri_of(CONFIG))
    if src.store.exists(GENERATION_CONFIG):
        check_special_ids(
            read_json(src.store, GENERATION_CONFIG), model.vocab_size, src.store.uri_of(GENERATION_CONFIG)
        )
    plan = tensor_plan(spec, model)
    src.check((s, shape) for m in plan for s, shape in zip(m.sources, m.shapes))
    layout = source_layout(src)
    store = open_root(out_uri, None, store_cfg)
    entries: list[ObjectEntry] = []
    nbytes = 0
    with AsyncCheckpointWriter(store, run, async_upload=False, max_concurrency=WRITE_CONCURRENCY) as writer:

        def save(objects: dict[str, Any]) -> None:
            entries.extend(writer.save(0, objects).result().entries)

        dense: dict[str, dict] = {"params": {}, "buffers": {}, "optim": {}}
        for m in plan:
            if m.kind_of_target != "expert":
                t = _read_target(src, m, spec)
                nbytes += t.numel() * t.element_size()
                dense["params" if m.kind_of_target == "dense" else "buffers"][m.target.split(":", 1)[1]] = t
        save({DENSE: dense})
        del dense
        groups = expert_groups(plan)
        for layer in sorted({layer for layer, _ in groups}):  # one MoE layer's experts at a time,
            objects = {}  # written concurrently
            for (g_layer, e), maps in groups.items():
                if g_layer == layer:
                    obj = {m.target.rsplit(":", 1)[1]: _read_target(src, m, spec) for m in maps}
                    nbytes += sum(t.numel() * t.element_size() for t in obj.values())
                    objects[expert_object_name(layer, e)] = obj
            save(objects)
            del objects
        tokenizer_files = [f for f in TOKENIZER_FILES if src.store.exists(f)]
        save(
            {
                TOKENIZER_PREFIX + f: {"file": f, "data": np.frombuffer(src.store.read_bytes(f), dtype=np.uint8).copy()}
                for f in tokenizer_files
            }
        )
    src.close()
    commit(store, run, 0, [entries], run_meta(model, src.config, src_uri, tokenizer_files, layout))
    ref = CheckpointRef(store, run, 0)
    note = context_text(model.max_seq_len, context_of(src.config, None, src.store.uri_of(CONFIG))[1])
    log.info("imported %s (%s) -> %s: %d objects; %s", src_uri, spec.model_type, ref.uri, len(entries), note)
    return ConvertReport(
        uri=ref.uri, tensors=sum(len(m.sources) for m in plan), bytes=nbytes, files=len(entries), note=note
    )
