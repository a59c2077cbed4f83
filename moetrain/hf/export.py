"""Export a moetrain checkpoint as an HF model directory (the way back of :mod:`moetrain.hf.convert`).

Owns: :func:`export_hf` (a committed checkpoint -> ``config.json``, safetensors weights in the
source's dtype (or ``--dtype``) and shards sized like the source's (or ``--max-shard-size``),
``model.safetensors.index.json`` when sharded, and the tokenizer files), and
:func:`checkpoint_model` (the model config a checkpoint was written with).

Streaming: export reads ``dense.pt`` once and then one layer's expert objects at a time
(concurrent reads), writing each shard header first from the objects' headers (no tensor data
needed to plan). The model is never in memory twice. It goes through ``moetrain.storage``, so
every path may be a local directory or an ``s3://`` / ``gs://`` URI.
"""

from __future__ import annotations

import json
import logging
import struct

import numpy as np
import torch

from moetrain.checkpoint import load_objects, read_manifest, resolve
from moetrain.checkpoint.format import MAGIC, _PREFIX
from moetrain.checkpoint.layout import CheckpointRef
from moetrain.storage import Store, open_store
from moetrain.config import ModelConfig, RunConfig, StoreConfig, _from_dict
from moetrain.hf.arch import ARCHS, SUPPORTED, ArchSpec, hf_config_from_model
from moetrain.hf.convert import (
    TOKENIZER_PREFIX,
    WRITE_CONCURRENCY,
    ConvertReport,
    SourceLayout,
    expert_groups,
    source_layout,
)
from moetrain.hf.errors import HFError
from moetrain.hf.safetensors_io import (
    CONFIG,
    INDEX,
    SINGLE,
    TOKENIZER_FILES,
    HFDir,
    open_dir,
    shard_header,
    write_shard,
)
from moetrain.hf.tensors import TensorMap, tensor_plan, to_hf
from moetrain.train.state import DENSE, expert_object_name

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 4 << 30  # shard size when the source's is unknown (HF's usual order of magnitude)
EXPORT_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


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
        if prefix[: len(MAGIC)] != MAGIC:
            raise HFError(f"{store.uri_of(ref.key(name))}: not a moetrain checkpoint object")
        header = json.loads(f.read(struct.unpack("<Q", prefix[len(MAGIC) :])[0]))
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
        self.ref, self.manifest, self.spec = ref, manifest, spec
        self.dense: dict | None = dense
        self.by_hf = {s: m for m in plan for s in m.sources}
        self.layer_experts: dict[int, list[int]] = {}
        for layer, e in expert_groups(plan):
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
        assert self.dense is not None, "a dense tensor asked for after the expert tensors"
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


def _nbytes(entry: tuple) -> int:
    return int(np.prod(entry[2])) * torch.empty((), dtype=entry[1]).element_size()


def _shards(entries: list[tuple], max_bytes: int) -> list[list[tuple]]:
    """Greedy: a new shard when the next tensor would pass ``max_bytes`` (HF's rule)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _shards_like(entries: list[tuple], layout: SourceLayout) -> list[list[tuple]]:
    """Sized like the source: as many shards as it had (more if the dtype grew, so that none is
    larger than its largest), cut where the running byte count crosses equal shares."""
    total = sum(_nbytes(e) for e in entries)
    k = max(layout.shards, -(-total // max(1, layout.shard_bytes)))
    shards: list[list[tuple]] = [[] for _ in range(k)]
    done = 0
    for entry in entries:
        nbytes = _nbytes(entry)
        shards[min(k - 1, int((done + nbytes / 2) * k // max(1, total)))].append(entry)
        done += nbytes
    return [s for s in shards if s]


def parse_size(text: str) -> int:
    """``--max-shard-size``: bytes from ``5GB``, ``500MB``, ``2GiB``, ``40KB`` or a plain integer."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "TIB": 1 << 40,
    }
    t = text.strip().upper()
    digits = t.rstrip("KMGTIB")
    try:
        value = float(digits) * units[t[len(digits) :]]
    except (ValueError, KeyError):
        raise HFError(f"--max-shard-size ({text!r}) must be a size such as 5GB, 500MB or 2GiB") from None
    if not value >= 1:
        raise HFError(f"--max-shard-size ({text!r}) must be at least 1 byte")
    return int(value)


def _dtype_plan(entries: list[tuple], dtype: str, layout: SourceLayout | None) -> list[tuple]:
    """``entries`` with the dtype each tensor is exported in: ``fp32`` / ``bf16`` for every
    floating tensor; ``auto`` the source's dtype per tensor as recorded at import (the
    checkpoint's own dtype when the checkpoint has no HF source)."""
    if dtype not in EXPORT_DTYPES:
        raise HFError(f"--dtype ({dtype!r}) must be one of {', '.join(EXPORT_DTYPES)}")
    out = []
    for name, have, shape in entries:
        if not have.is_floating_point:
            want = have
        elif dtype != "auto":
            want = EXPORT_DTYPES[dtype]
        elif layout is not None:
            want = getattr(torch, layout.dtypes.get(name, layout.dtype))
        else:
            want = have
        out.append((name, want, shape))
    return out


def _copy_tokenizer(
    ref, manifest, out, run_cfg: RunConfig, tokenizer_dir: str, store_cfg: StoreConfig | None
) -> list[str]:
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
    store = open_dir(src, store_cfg)
    copied = [f for f in TOKENIZER_FILES if store.exists(f)]
    for f in copied:
        out.write_bytes(f, store.read_bytes(f))
    return copied


def _hf_base(manifest, store_cfg: StoreConfig | None) -> tuple[dict | None, SourceLayout | None]:
    """(the HF config.json a checkpoint descends from, how that model was stored): recorded at
    import, or read from its run's model.init_from directory (headers only)."""
    hf = manifest.meta.get("hf") or {}
    if hf.get("config"):
        layout = hf.get("layout")
        return hf["config"], SourceLayout.from_dict(layout) if layout else None
    init_from = ((manifest.meta.get("config") or {}).get("model") or {}).get("init_from", "")
    if init_from.startswith("hf:"):
        src = HFDir(init_from[3:], store_cfg)
        src.close()
        return src.config, source_layout(src)
    return None, None


def export_hf(
    ckpt_uri: str,
    out_uri: str,
    *,
    arch: str = "",
    dtype: str = "auto",
    max_shard_bytes: int = 0,
    tokenizer_dir: str = "",
    store_cfg: StoreConfig | None = None,
) -> ConvertReport:
    """Committed checkpoint ``ckpt_uri`` (a step or run URI) -> HF directory ``out_uri``.

    ``dtype``: ``auto`` (the source model's, as recorded at import), ``fp32`` or ``bf16``.
    ``max_shard_bytes``: 0 = shards like the source's (count and size), else HF's greedy rule.
    One shard is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``."""
    if max_shard_bytes < 0:
        raise HFError(f"--max-shard-size ({max_shard_bytes}) must be > 0")
    ref = resolve(ckpt_uri, store_cfg=store_cfg)
    manifest = read_manifest(ref)
    hf_base, layout = _hf_base(manifest, store_cfg)
    spec = _export_arch(ref, arch, hf_base)
    dense = load_objects(ref, [DENSE], manifest=manifest)[DENSE]
    model, run_cfg = checkpoint_model(manifest, dense)
    plan = tensor_plan(spec, model)
    entries = _dtype_plan(_plan_entries(ref, dense, plan, spec), dtype, layout)
    main_dtype = _main_dtype(entries)
    hf_config = _export_config(spec, model, hf_base, main_dtype)
    out = open_store(out_uri, store_cfg)
    source = _Source(ref, manifest, dense, spec, plan)
    del dense
    if max_shard_bytes:
        shards = _shards(entries, max_shard_bytes)
    else:
        shards = _shards_like(entries, layout) if layout else _shards(entries, DEFAULT_SHARD_BYTES)
    total = _write_weights(out, shards, source, {n: d for n, d, _ in entries})
    out.write_bytes(CONFIG, json.dumps(hf_config, indent=2).encode())
    copied = _copy_tokenizer(ref, manifest, out, run_cfg, tokenizer_dir, store_cfg)
    largest = max(shard_header(s)[1] for s in shards)
    note = f"dtype {main_dtype}, {len(shards)} shard(s) of at most {largest / 1e6:.1f} MB"
    log.info(
        "exported %s -> %s (%s): %s, %d tensors, tokenizer files %s",
        ref.uri,
        out.uri,
        spec.model_type,
        note,
        len(entries),
        copied,
    )
    return ConvertReport(uri=out.uri, tensors=len(entries), bytes=total, files=len(shards), note=note)


def _export_arch(ref: CheckpointRef, arch: str, hf_base: dict | None) -> ArchSpec:
    """The architecture to export as: ``arch``, else the one the checkpoint was imported from."""
    name = arch or (hf_base or {}).get("model_type", "")
    if not name:
        raise HFError(f"{ref.uri} was not imported from Hugging Face: pass --arch (one of {', '.join(ARCHS)})")
    if name not in ARCHS:
        raise HFError(f"unsupported architecture {name!r}; supported: {SUPPORTED}")
    return ARCHS[name]


def _main_dtype(entries: list[tuple]) -> str:
    """The export dtype of most tensor bytes, e.g. ``"bfloat16"``: config.json's ``dtype``."""
    by_dtype: dict[torch.dtype, int] = {}
    for e in entries:
        by_dtype[e[1]] = by_dtype.get(e[1], 0) + _nbytes(e)
    return str(max(by_dtype, key=lambda d: (by_dtype[d], str(d)))).removeprefix("torch.")


def _export_config(spec: ArchSpec, model: ModelConfig, hf_base: dict | None, main_dtype: str) -> dict:
    """config.json: on top of the source's when it is of the same architecture, with the dtype
    (and ``torch_dtype`` where the source has that older field) ``main_dtype``."""
    base = hf_base if hf_base and hf_base.get("model_type") == spec.model_type else None
    hf_config = hf_config_from_model(spec, model, base, dtype=main_dtype)
    if "torch_dtype" in hf_config:
        hf_config["torch_dtype"] = main_dtype
    return hf_config


def _write_weights(out: Store, shards: list[list[tuple]], source: _Source, want: dict[str, torch.dtype]) -> int:
    """The safetensors shards, each tensor in its export dtype (``want``), plus the index when
    there are several; returns the tensor bytes written."""
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        key = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out, key, shard, lambda n: source.tensor(n).to(want[n]))
        total += shard_header(shard)[1]
        weight_map.update({n: key for n, _, _ in shard})
    if len(shards) > 1:
        out.write_bytes(
            INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
        )
    return total
