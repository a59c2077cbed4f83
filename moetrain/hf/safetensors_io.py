"""Streaming safetensors reader and writer over the checkpoint store layer (``pyarrow.fs``).

Owns: :class:`HFDir` (an HF model directory on a local path or an object-storage URI: its
``config.json``, the shard files named by ``model.safetensors.index.json`` or the single
``model.safetensors``, each tensor read on its own with one ranged read) and
:func:`write_shard` (one ``.safetensors`` file streamed tensor by tensor, header first).

The format (https://github.com/huggingface/safetensors): u64 little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"}``,
then the data; offsets are relative to the data start. Parsed here rather than through
``safetensors.safe_open`` because that needs a local file, and object stores are the point.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from moetrain.config import StoreConfig
from moetrain.storage import Store, open_store
from moetrain.hf.errors import HFError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", GENERATION_CONFIG)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
ALIGN = 8  # data offsets are padded so every tensor starts 8-byte aligned
_SHARD = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the shard file
    nbytes: int


def open_dir(uri: str, store_cfg: StoreConfig | None = None) -> Store:
    """An HF model directory (local path, ``s3://``, ``gs://``) with the run's endpoints."""
    return open_store(uri, store_cfg, probe=False)


def read_json(store: Store, key: str) -> dict:
    if not store.exists(key):
        raise HFError(f"{store.uri_of(key)} not found")
    try:
        value = json.loads(store.read_bytes(key))
    except ValueError as exc:  # UnicodeDecodeError included
        raise HFError(f"{store.uri_of(key)} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HFError(f"{store.uri_of(key)} is a JSON {type(value).__name__}, not an object")
    return value


def _read_header(store: Store, shard: str) -> dict[str, TensorInfo]:
    """The tensors of one shard, from its header, every claim checked against the file: valid
    UTF-8 JSON object, known dtypes, shapes and offsets that agree, no overlap, inside the file."""
    where = store.uri_of(shard)
    with store.fs.open_input_file(store.path(shard)) as f:
        size = f.size()
        head = f.read(8)
        if len(head) < 8:
            raise HFError(f"{where}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise HFError(f"{where}: not a safetensors file (header length {n}, file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise HFError(f"{where}: safetensors header is not valid UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise HFError(f"{where}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise HFError(f"{where}: safetensors header is a JSON {type(header).__name__}, not an object")
    out = {
        name: _tensor_info(where, shard, name, meta, 8 + n) for name, meta in header.items() if name != "__metadata__"
    }
    spans = sorted((i.offset, i.offset + i.nbytes, name) for name, i in out.items() if i.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise HFError(f"{where}: safetensors header is inconsistent: tensors {a} and {b} overlap")
    if spans and spans[-1][1] > size:
        raise HFError(f"{where}: tensor {spans[-1][2]} ends past the end of the file (truncated shard?)")
    return out


def _tensor_info(where: str, shard: str, name: str, meta, data_start: int) -> TensorInfo:
    """One header entry, checked: dtype known, shape of non-negative ints, offsets [lo, hi] with
    hi - lo = the bytes the dtype and shape need."""
    bad = f"{where}: safetensors header is inconsistent: tensor {name}"
    if not isinstance(meta, dict):
        raise HFError(f"{bad} is described by {meta!r}, not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in DTYPES:
        raise HFError(f"{where}: tensor {name} has dtype {dtype}, which moetrain does not read")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise HFError(f"{bad} has shape {shape!r} (not a list of non-negative integers)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise HFError(f"{bad} has data_offsets {offsets!r} (not [begin, end] with 0 <= begin <= end)")
    need = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=DTYPES[dtype]).element_size()
    if offsets[1] - offsets[0] != need:
        raise HFError(
            f"{bad} has data_offsets {offsets} ({offsets[1] - offsets[0]} bytes) but {dtype} {shape} needs {need} bytes"
        )
    return TensorInfo(shard, DTYPES[dtype], tuple(shape), data_start + offsets[0], need)


class HFDir:
    """An HF model directory (local path or URI), read tensor by tensor."""

    def __init__(self, uri: str, store_cfg: StoreConfig | None = None) -> None:
        self.uri = uri
        self.store = open_dir(uri, store_cfg)
        self.config = read_json(self.store, CONFIG)
        self.tensors = self._index()
        self._files: dict[str, Any] = {}  # shard -> open pyarrow input file

    def _index(self) -> dict[str, TensorInfo]:
        present = {n for n in self.store.list_dir("") if _SHARD.match(n)}
        if self.store.exists(INDEX):
            weight_map = read_json(self.store, INDEX).get("weight_map") or {}
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise HFError(f"{self.store.uri_of(INDEX)}: weight_map is not an object of tensor name -> shard file")
            shards = sorted(set(weight_map.values()))
        elif SINGLE in present:
            weight_map, shards = None, [SINGLE]
        else:
            raise HFError(f"{self.uri}: no {INDEX} and no {SINGLE}")
        missing = [s for s in shards if s not in present]
        if missing:
            names = sorted(n for n, s in (weight_map or {}).items() if s == missing[0])
            raise HFError(
                f"{self.store.uri_of(missing[0])}: shard missing (it holds {names[0]} and "
                f"{len(names) - 1} more tensors)"
            )
        extra = sorted(present - set(shards))
        if extra:
            raise HFError(f"{self.store.uri_of(extra[0])}: extra shard not listed in {INDEX}")
        infos: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in _read_header(self.store, shard).items():
                if weight_map is not None and weight_map.get(name) != shard:
                    raise HFError(f"{self.store.uri_of(shard)}: tensor {name} is not listed for this shard in {INDEX}")
                infos[name] = info
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(infos))
            if absent:
                raise HFError(
                    f"{self.store.uri_of(weight_map[absent[0]])}: tensor {absent[0]} listed in {INDEX} "
                    "is not in the shard"
                )
        return infos

    def check(self, expected: Iterable[tuple[str, tuple[int, ...]]]) -> None:
        """Every expected (name, shape) is present with that shape, and nothing else is."""
        want = dict(expected)
        for name, shape in want.items():
            info = self.tensors.get(name)
            if info is None:
                raise HFError(f"{self.uri}: tensor {name} is missing")
            if info.shape != tuple(shape):
                raise HFError(
                    f"{self.store.uri_of(info.shard)}: tensor {name} has shape {list(info.shape)}, "
                    f"the config implies {list(shape)}"
                )
        extra = sorted(set(self.tensors) - set(want))
        if extra:
            raise HFError(
                f"{self.store.uri_of(self.tensors[extra[0]].shard)}: unexpected tensor {extra[0]} "
                f"({len(extra)} in all): not part of this {self.config.get('model_type')} config"
            )

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype (one ranged read)."""
        info = self.tensors[name]
        f = self._files.get(info.shard)
        if f is None:
            f = self._files[info.shard] = self.store.fs.open_input_file(self.store.path(info.shard))
        buf = np.empty(info.nbytes, dtype=np.uint8)
        f.seek(info.offset)
        got = f.readinto(buf) if info.nbytes else 0
        if got != info.nbytes:
            raise HFError(
                f"{self.store.uri_of(info.shard)}: short read of tensor {name} ({got} of {info.nbytes} bytes)"
            )
        return torch.from_numpy(buf).view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def shard_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
    """(u64 length + JSON header, data bytes) for tensors written in ``entries`` order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % ALIGN)
    return struct.pack("<Q", len(body)) + body, offset


def write_shard(
    store: Store,
    key: str,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensor_of: Callable[[str], torch.Tensor],
) -> int:
    """Stream one shard: the header, then ``tensor_of(name)`` for each entry in order (so the
    caller decides what is in memory). Atomic (temporary key + move). Returns its size."""
    header, _ = shard_header(entries)

    def produce(sink) -> None:
        sink.write(header)
        for name, dtype, shape in entries:
            t = tensor_of(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise HFError(
                    f"{store.uri_of(key)}: tensor {name} is {t.dtype} {list(t.shape)}, planned {dtype} {list(shape)}"
                )
            t = t.detach().contiguous()
            if t.numel():
                sink.write(t.reshape(-1).view(torch.uint8).numpy())

    return store.write_atomic(key, produce).size
