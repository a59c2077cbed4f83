"""Import an HF model directory as a moetrain checkpoint, and export a checkpoint back.

Owns: :func:`import_hf` (HF dir -> ``<out>/<run>/step-0``: ``dense.pt`` and one object per
expert, as training writes them, placement-independent, plus the tokenizer files as
``tokenizer/<file>`` objects; the manifest's meta carries the moetrain config and the original
``config.json``) and :func:`export_hf` (a committed checkpoint -> ``config.json``, safetensors
shards, ``model.safetensors.index.json`` and the tokenizer files).

Streaming: import reads one HF tensor at a time (ranged reads) and writes one MoE layer's
expert objects at a time, concurrently; only the dense parameters (one object) or one layer's
experts are held together. Export reads ``dense.pt`` once and then one layer's expert objects
at a time (concurrent reads), writing each shard header first from the objects' headers (no
tensor data needed to plan). The model is never in memory twice. Both sides go through ``moetrain.checkpoint.storage``, so every path may
be a local directory or an ``s3://`` / ``gs://`` URI.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moetrain.checkpoint import AsyncCheckpointWriter, commit, load_objects, read_manifest, resolve
from moetrain.checkpoint.format import MAGIC, _PREFIX
from moetrain.checkpoint.layout import CheckpointRef
from moetrain.checkpoint.storage import open_store
from moetrain.config import (
    CheckpointConfig, ClusterConfig, DataConfig, ModelConfig, RunConfig, _from_dict,
)
from moetrain.hf.arch import ARCHS, SUPPORTED, ArchSpec, arch_of, hf_config_from_model, model_config_from_hf
from moetrain.hf.errors import HFError
from moetrain.hf.safetensors_io import (
    CONFIG, INDEX, TOKENIZER_FILES, HFDir, open_dir, read_json, shard_header, write_shard,
)
from moetrain.hf.tensors import TensorMap, tensor_plan, to_hf, to_moetrain
from moetrain.model.transformer import count_moe_blocks
from moetrain.train.state import DENSE, expert_object_name
from placement.placement import Placement

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 4 << 30  # HF's usual shard size order of magnitude
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


def _expert_groups(plan: list[TensorMap]) -> dict[tuple[int, int], list[TensorMap]]:
    groups: dict[tuple[int, int], list[TensorMap]] = {}
    for m in plan:
        if m.kind_of_target == "expert":
            _, layer, e, _ = m.target.split(":")
            groups.setdefault((int(layer), int(e)), []).append(m)
    return groups


def _read_target(src: HFDir, m: TensorMap, spec: ArchSpec) -> torch.Tensor:
    return to_moetrain(m, [src.read(s) for s in m.sources], interleaved_rope=spec.interleaved_rope)


def run_meta(model: ModelConfig, hf_config: dict, source: str, tokenizer_files: list[str]) -> dict[str, Any]:
    """Manifest meta of an imported checkpoint: resumable fields plus the HF config."""
    run_cfg = RunConfig(model=model, cluster=ClusterConfig(num_workers=1),
                        data=DataConfig(tokenizer=f"hf:{source}" if "tokenizer.json" in tokenizer_files else "bpe"))
    placement = Placement.contiguous(count_moe_blocks(model), model.moe.num_experts, 1)
    return {"step": 0, "run_id": "", "cursor": {}, "placement": placement.to_json(), "config": run_cfg.to_dict(),
            "hf": {"config": hf_config, "source": source, "tokenizer_files": tokenizer_files}}


def import_hf(src_uri: str, out_uri: str, run: str = "hf", *, cfg: CheckpointConfig | None = None) -> ConvertReport:
    """HF directory ``src_uri`` -> committed checkpoint ``<out_uri>/<run>/step-0``."""
    cfg = cfg or CheckpointConfig(uri=out_uri)
    src = HFDir(src_uri, cfg)
    spec = arch_of(src.config, src.store.uri_of(CONFIG))
    model = model_config_from_hf(src.config, where=src.store.uri_of(CONFIG))
    plan = tensor_plan(spec, model)
    src.check((s, shape) for m in plan for s, shape in zip(m.sources, m.shapes))
    store = open_store(out_uri, cfg)
    entries, nbytes = [], 0
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
        groups = _expert_groups(plan)
        for layer in sorted({layer for layer, _ in groups}):  # one MoE layer's experts at a time,
            objects = {}                                      # written concurrently
            for (l, e), maps in groups.items():
                if l == layer:
                    obj = {m.target.rsplit(":", 1)[1]: _read_target(src, m, spec) for m in maps}
                    nbytes += sum(t.numel() * t.element_size() for t in obj.values())
                    objects[expert_object_name(layer, e)] = obj
            save(objects)
            del objects
        tokenizer_files = [f for f in TOKENIZER_FILES if src.store.exists(f)]
        save({TOKENIZER_PREFIX + f: {"file": f, "data": np.frombuffer(src.store.read_bytes(f), dtype=np.uint8).copy()}
              for f in tokenizer_files})
    src.close()
    commit(store, run, 0, [entries], run_meta(model, src.config, src_uri, tokenizer_files))
    ref = CheckpointRef(store, run, 0)
    log.info("imported %s (%s) -> %s: %d objects", src_uri, spec.model_type, ref.uri, len(entries))
    return ConvertReport(uri=ref.uri, tensors=sum(len(m.sources) for m in plan), bytes=nbytes, files=len(entries))


# ---- export --------------------------------------------------------------------------------------


def checkpoint_model(manifest, dense: dict) -> tuple[ModelConfig, RunConfig]:
    """The model config a checkpoint was written with (vocab size from the embedding)."""
    saved = manifest.meta.get("config")
    if not saved:
        raise HFError(f"checkpoint step {manifest.step} of run {manifest.run} has no config in its manifest")
    run_cfg = _from_dict(RunConfig, saved, "")
    model = run_cfg.model
    if model.vocab_size == 0:
        import dataclasses
        model = dataclasses.replace(model, vocab_size=int(dense["params"]["tok_embed_VD"].shape[0]))
    return model, run_cfg


def _object_tensors(ref: CheckpointRef, name: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a flat object, from its header only (one small ranged read)."""
    store = ref.store
    with store.fs.open_input_file(store.path(ref.key(name))) as f:
        prefix = f.read(_PREFIX)
        if prefix[:len(MAGIC)] != MAGIC:
            raise HFError(f"{store.uri_of(ref.key(name))}: not a moetrain checkpoint object")
        header = json.loads(f.read(struct.unpack("<Q", prefix[len(MAGIC):])[0]))
    metas = header["tensors"]
    out = {}
    for key, node in header["tree"]["__dict__"]:
        if isinstance(node, dict) and "__tensor__" in node:
            meta = metas[node["__tensor__"]]
            out[key] = (getattr(torch, meta["dtype"]), tuple(meta["shape"]))
    return out


class _Source:
    """The checkpoint's tensors by HF name: dense.pt held while dense tensors are written, then
    one MoE layer's expert objects at a time."""

    def __init__(self, ref: CheckpointRef, manifest, dense: dict, spec: ArchSpec, plan: list[TensorMap]) -> None:
        self.ref, self.manifest, self.dense, self.spec = ref, manifest, dense, spec
        self.by_hf = {s: m for m in plan for s in m.sources}
        self.layer_experts: dict[int, list[int]] = {}
        for layer, e in _expert_groups(plan):
            self.layer_experts.setdefault(layer, []).append(e)
        self._objs: dict[str, dict] = {}  # the current MoE layer's expert objects
        self._parts: dict[str, torch.Tensor] = {}

    def _value(self, m: TensorMap) -> torch.Tensor:
        kind, rest = m.target.split(":", 1)
        if kind == "expert":
            layer, e, key = rest.split(":")
            name = expert_object_name(int(layer), int(e))
            if name not in self._objs:
                self.dense = None  # dense tensors come first: release them
                names = [expert_object_name(int(layer), x) for x in self.layer_experts[int(layer)]]
                self._objs = load_objects(self.ref, names, manifest=self.manifest, max_concurrency=WRITE_CONCURRENCY)
            return self._objs[name][key]
        value = self.dense["params" if kind == "dense" else "buffers"].get(rest)
        if value is None:
            raise HFError(f"{self.ref.uri}/{DENSE}: tensor {rest} is missing (a different model config?)")
        return value

    def tensor(self, hf_name: str) -> torch.Tensor:
        if hf_name not in self._parts:
            m = self.by_hf[hf_name]
            self._parts = dict(zip(m.sources, to_hf(m, self._value(m), interleaved_rope=self.spec.interleaved_rope)))
        return self._parts.pop(hf_name)


def _plan_entries(ref: CheckpointRef, dense: dict, plan: list[TensorMap], spec: ArchSpec) -> list[tuple]:
    """(hf name, dtype, shape) of every tensor in write order, from dense.pt and object headers."""
    out, headers = [], {}
    for m in plan:
        kind, rest = m.target.split(":", 1)
        if kind == "expert":
            layer, e, key = rest.split(":")
            name = expert_object_name(int(layer), int(e))
            if name not in headers:
                headers = {name: _object_tensors(ref, name)}
            if key not in headers[name]:
                raise HFError(f"{ref.uri}/{name}: tensor {key} is missing")
            dtype, shape = headers[name][key]
        else:
            value = dense["params" if kind == "dense" else "buffers"].get(rest)
            if value is None:
                raise HFError(f"{ref.uri}/{DENSE}: tensor {rest} is missing (a different model config?)")
            dtype, shape = value.dtype, tuple(value.shape)
        flat = int(np.prod(shape)) if m.kind != "row" else None
        want = sum(int(np.prod(s)) for s in m.shapes)
        if flat is not None and flat != want:
            raise HFError(f"{ref.uri}: tensor {rest} has shape {list(shape)}, the config implies {want} elements")
        out += [(s, dtype, tuple(shape_s)) for s, shape_s in zip(m.sources, m.shapes)]
    return out


def _shards(entries: list[tuple], max_bytes: int) -> list[list[tuple]]:
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[2])) * torch.empty((), dtype=entry[1]).element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _copy_tokenizer(ref, manifest, out, run_cfg: RunConfig, tokenizer_dir: str) -> list[str]:
    names = [e.name for e in manifest.entries if e.name.startswith(TOKENIZER_PREFIX)]
    if names and not tokenizer_dir:
        objs = load_objects(ref, names, manifest=manifest)
        for obj in objs.values():
            out.write_bytes(obj["file"], obj["data"].tobytes())
        return [o["file"] for o in objs.values()]
    src = tokenizer_dir or (run_cfg.data.tokenizer[3:] if run_cfg.data.tokenizer.startswith("hf:") else "")
    if not src:
        log.warning("no tokenizer files to copy (the checkpoint used the trained BPE): pass --tokenizer DIR")
        return []
    store = open_dir(src)
    copied = [f for f in TOKENIZER_FILES if store.exists(f)]
    for f in copied:
        out.write_bytes(f, store.read_bytes(f))
    return copied


def _hf_base(manifest, cfg: CheckpointConfig) -> dict | None:
    """The HF config.json a checkpoint descends from: imported, or its run's model.init_from."""
    hf = (manifest.meta.get("hf") or {}).get("config")
    if hf:
        return hf
    init_from = ((manifest.meta.get("config") or {}).get("model") or {}).get("init_from", "")
    if init_from.startswith("hf:"):
        return read_json(open_dir(init_from[3:], cfg), CONFIG)
    return None


def export_hf(ckpt_uri: str, out_uri: str, *, arch: str = "", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              tokenizer_dir: str = "", cfg: CheckpointConfig | None = None) -> ConvertReport:
    """Committed checkpoint ``ckpt_uri`` (a step or run URI) -> HF directory ``out_uri``."""
    cfg = cfg or CheckpointConfig()
    ref = resolve(ckpt_uri, cfg)
    manifest = read_manifest(ref)
    hf_base = _hf_base(manifest, cfg)
    name = arch or (hf_base or {}).get("model_type", "")
    if not name:
        raise HFError(f"{ref.uri} was not imported from Hugging Face: pass --arch (one of {', '.join(ARCHS)})")
    if name not in ARCHS:
        raise HFError(f"unsupported architecture {name!r}; supported: {SUPPORTED}")
    spec = ARCHS[name]
    dense = load_objects(ref, [DENSE], manifest=manifest)[DENSE]
    model, run_cfg = checkpoint_model(manifest, dense)
    plan = tensor_plan(spec, model)
    entries = _plan_entries(ref, dense, plan, spec)
    dtype = str(dense["params"]["tok_embed_VD"].dtype).removeprefix("torch.")
    hf_config = hf_config_from_model(spec, model, hf_base if hf_base and hf_base.get("model_type") == name else None,
                                     dtype=dtype)
    out = open_store(out_uri, CheckpointConfig(uri=out_uri, s3_endpoint=cfg.s3_endpoint, gcs_endpoint=cfg.gcs_endpoint))
    source = _Source(ref, manifest, dense, spec, plan)
    del dense
    shards = _shards(entries, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        key = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out, key, shard, source.tensor)
        total += shard_header(shard)[1]
        weight_map.update({n: key for n, _, _ in shard})
    out.write_bytes(INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                      indent=2).encode())
    out.write_bytes(CONFIG, json.dumps(hf_config, indent=2).encode())
    copied = _copy_tokenizer(ref, manifest, out, run_cfg, tokenizer_dir)
    log.info("exported %s -> %s (%s): %d shards, %d tensors, tokenizer files %s", ref.uri, out.uri, name,
             len(shards), len(entries), copied)
    return ConvertReport(uri=out.uri, tensors=len(entries), bytes=total, files=len(shards))
