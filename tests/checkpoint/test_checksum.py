"""Object checksums: published CRC-32C / sha256 values, streaming = one-shot, the
``checkpoint.checksum`` field, and manifests written before crc32c (v1, sha256) still load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import google_crc32c
import numpy as np
import pyarrow as pa
import pytest
import torch

from moetrain.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointError,
    CorruptObjectError,
    InvalidNameError,
    commit,
    load_objects,
    open_root,
    open_store,
    read_manifest,
    resolve,
    verify,
)
from moetrain.checkpoint.cli import ckpt_verify
from moetrain.checkpoint.layout import CheckpointRef, ObjectEntry
from moetrain.config import CheckpointConfig, ConfigError, RunConfig, validate
from moetrain.storage.checksum import COPY_BYTES, Crc32c, digest, new_hasher
from moetrain.storage.sink import CHUNK_BYTES, HashingSink

from .helpers import assert_same, make_objects

# Published check values: CRC-32C of "123456789" (the CRC catalogue's "check" of CRC-32/ISCSI),
# the RFC 3720 (iSCSI) B.4 vectors, and FIPS 180-2's sha256("abc").
CRC32C_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_published_check_values():
    for data, value in CRC32C_VECTORS:
        assert digest("crc32c", data) == f"{value:08x}", data
    assert digest("crc32c", b"123456789") == "e3069283"
    assert digest("sha256", b"abc") == SHA256_ABC
    with pytest.raises(ValueError, match="'md5'"):
        digest("md5", b"abc")


@pytest.mark.parametrize("algorithm", ["crc32c", "sha256"])
def test_streamed_chunks_equal_the_one_shot_digest(algorithm):
    data = np.random.default_rng(0).integers(0, 256, 2 * COPY_BYTES + 12345, dtype=np.uint8)
    one_shot = digest(algorithm, data.tobytes())
    hasher = new_hasher(algorithm)
    # odd cuts, some crossing COPY_BYTES; writable views, bytes and bytearrays mixed
    cuts = [0, 1, 7, 4096, COPY_BYTES - 3, COPY_BYTES + 5, 2 * COPY_BYTES + 1, data.nbytes]
    for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        piece = memoryview(data)[lo:hi]
        hasher.update([piece, piece.tobytes(), bytearray(piece)][i % 3])
    assert hasher.hexdigest() == one_shot
    assert digest(algorithm, memoryview(data)) == one_shot  # a writable buffer, one call
    if algorithm == "sha256":
        assert one_shot == hashlib.sha256(data.tobytes()).hexdigest()


@pytest.mark.parametrize("algorithm", ["crc32c", "sha256"])
def test_sink_pipelined_slices_equal_the_one_shot_digest(algorithm):
    # > CHUNK_BYTES: slices hashed on the helper thread beside the write, then small ones inline
    data = os.urandom(2 * CHUNK_BYTES + 99)
    out = pa.BufferOutputStream()
    sink = HashingSink(out, checksum=algorithm)
    sink.write(data[:CHUNK_BYTES + 1000])
    sink.write(bytearray(data[CHUNK_BYTES + 1000:CHUNK_BYTES + 1010]))
    sink.write(memoryview(data)[CHUNK_BYTES + 1010:])
    assert out.getvalue().to_pybytes() == data and sink.size == len(data)
    assert sink.hexdigest() == digest(algorithm, data)


def test_crc32c_value_matches_the_hex_digest():
    crc = Crc32c()
    crc.update(b"1234")
    crc.update(memoryview(bytearray(b"56789")))
    assert crc.value == 0xE3069283 and crc.hexdigest() == "e3069283"


def test_direct_libcrc32c_calls_equal_the_package_api():
    if not sys.platform.startswith("linux"):
        pytest.skip("libcrc32c is found through /proc/self/maps (Linux)")
    data = np.random.default_rng(1).integers(0, 256, COPY_BYTES + 777, dtype=np.uint8)
    tensor = torch.from_numpy(data[:4096].copy()).view(torch.float32)  # a non-byte format
    for piece in (b"", b"123456789", bytearray(b"x" * 1000), memoryview(data),
                  memoryview(tensor.numpy())):
        fast, package = Crc32c(native=True), Crc32c(native=False)  # native=True raises where there is no libcrc32c
        fast.update(piece)
        package.update(piece)
        expected = google_crc32c.value(memoryview(piece).cast("B").tobytes())
        assert fast.value == package.value == expected


def test_checksum_field_is_validated():
    cfg = RunConfig()
    cfg.checkpoint.checksum = "md5"
    with pytest.raises(ConfigError, match=r"checkpoint\.checksum \('md5'\)"):
        validate(cfg)
    with pytest.raises(InvalidNameError, match=r"checkpoint\.checksum \('md5'\)"):
        open_root("/tmp", CheckpointConfig(checksum="md5"))
    assert CheckpointConfig().checksum == "crc32c"


@pytest.mark.parametrize("checksum", ["crc32c", "sha256"])
def test_checksum_field_decides_what_the_manifest_records(tmp_path, checksum):
    cfg = CheckpointConfig(uri=str(tmp_path / "ckpt"), checksum=checksum)
    objs = make_objects(experts=1, dim=4)
    with AsyncCheckpointWriter.from_config(cfg, "run") as w:  # the cluster's way in
        result = w.save(1, objs).result()
    commit(open_root(cfg.uri, cfg), "run", 1, [result])
    on_disk = json.loads((tmp_path / "ckpt/run/step-1/manifest.json").read_text())
    assert on_disk["version"] == 2
    for entry in on_disk["entries"]:
        stored = (tmp_path / "ckpt/run/step-1" / entry["name"]).read_bytes()
        other = "sha256" if checksum == "crc32c" else "crc32c"
        assert other not in entry and entry["size"] == len(stored)
        if checksum == "crc32c":  # straight from the package, not through moetrain
            assert entry["crc32c"] == f"{google_crc32c.value(stored):08x}"
        else:
            assert entry["sha256"] == hashlib.sha256(stored).hexdigest()
    # read back under the *other* setting: the manifest, not the config, decides
    other_cfg = dataclasses.replace(cfg, checksum="sha256" if checksum == "crc32c" else "crc32c")
    ref = resolve("latest", other_cfg, run="run")
    assert verify(ref).ok and verify(ref).checksums == (checksum,)
    assert_same(objs, load_objects(ref, list(objs)))


def _v1_manifest(ref: CheckpointRef, entries: list[dict]) -> str:
    """A manifest exactly as the sha256-only code wrote it (format v1)."""
    return json.dumps({
        "format": "moetrain-checkpoint", "version": 1, "object_format": "MTCKPT/1",
        "run": ref.run, "step": ref.step, "created": "2026-11-01T00:00:00Z", "world_size": 1,
        "total_bytes": sum(e["size"] for e in entries), "entries": entries,
        "meta": {"step": ref.step}}, indent=1)


def test_v1_sha256_manifest_still_verifies_and_loads(store, backend):
    objs = make_objects(experts=2, dim=8)
    old = open_root(backend.uri, dataclasses.replace(backend.cfg, checksum="sha256"), backend.store_cfg)
    with AsyncCheckpointWriter(old, "run") as w:
        w.save(4, objs).result()
    ref = CheckpointRef(store, "run", 4)
    entries = []
    for name in sorted(objs):
        data = store.read_bytes(ref.key(name))  # sha256 computed here, independently
        entries.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    store.write_bytes(ref.manifest_key, _v1_manifest(ref, entries).encode())
    store.write_bytes("run/latest", b"step-4\n")
    manifest = read_manifest(ref)
    assert manifest.checksums == ("sha256",) and manifest.entries[0].digest == entries[0]["sha256"]
    ref = resolve("latest", backend.cfg, run="run", store_cfg=backend.store_cfg)  # the store's default is crc32c
    assert verify(ref).ok and verify(ref).checked == len(objs)
    assert_same(objs, load_objects(ref, list(objs)))
    data = bytearray(store.read_bytes(ref.key("experts/layer-0/expert-0")))
    data[100] ^= 0x40
    store.write_bytes(ref.key("experts/layer-0/expert-0"), bytes(data))
    report, text = ckpt_verify(ref.uri, backend.store_cfg)
    assert report.corrupt == ("experts/layer-0/expert-0",) and "(sha256)" in text
    with pytest.raises(CorruptObjectError, match="expert-0.*sha256"):
        load_objects(ref, ["experts/layer-0/expert-0"])


def test_entries_must_name_exactly_one_known_checksum():
    entry = ObjectEntry(name="a", size=3, checksum="crc32c", digest="e3069283")
    assert entry.to_dict() == {"name": "a", "size": 3, "crc32c": "e3069283"}
    assert ObjectEntry.from_dict(entry.to_dict()) == entry
    with pytest.raises(CheckpointError, match="exactly one checksum"):
        ObjectEntry.from_dict({"name": "a", "size": 3})
    with pytest.raises(CheckpointError, match="exactly one checksum"):
        ObjectEntry.from_dict({"name": "a", "size": 3, "crc32c": "00", "sha256": "00"})
    with pytest.raises(CheckpointError, match="'md5'"):
        ObjectEntry(name="a", size=3, checksum="md5", digest="00")


def test_unknown_manifest_version_is_refused(tmp_path):
    store = open_store(str(tmp_path))
    ref = CheckpointRef(store, "run", 1)
    text = json.loads(_v1_manifest(ref, []))
    store.write_bytes(ref.manifest_key, json.dumps({**text, "version": 3}).encode())
    with pytest.raises(CorruptObjectError, match="v3 is not 'moetrain-checkpoint' v1/v2"):
        read_manifest(ref)
