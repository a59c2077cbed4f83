"""Store: atomic streamed writes with checksums, reads, listing, typed errors (local and S3)."""

from __future__ import annotations

import hashlib
import os
import sys
import time

import pytest

from moetrain.checkpoint import (
    BucketNotFoundError,
    CheckpointError,
    InvalidNameError,
    ObjectNotFoundError,
    StoreAccessError,
    StoreUnreachableError,
    open_store,
)
from moetrain.config import StoreConfig
from moetrain.storage.store import TMP_MARK, classify_os_error, redact_uri
from tests.ports import free_port


def _crc32c_hex(data: bytes) -> str:
    """CRC-32C straight from the google-crc32c package (not through moetrain's wrapper)."""
    import google_crc32c
    return f"{google_crc32c.value(data):08x}"


def test_write_reports_size_and_checksum_of_what_was_stored(store):
    data = os.urandom(3 * (1 << 20) + 17)
    res = store.write_atomic("run/step-1/a", lambda sink: [sink.write(data[:100]), sink.write(data[100:])])
    assert store.checksum == "crc32c"  # the default
    assert (res.size, res.checksum, res.digest) == (len(data), "crc32c", _crc32c_hex(data))
    assert store.read_bytes("run/step-1/a") == data
    assert [(f.key, f.size) for f in store.list_files("run")] == [("run/step-1/a", len(data))]
    assert store.exists("run/step-1/a") and not store.exists("run/step-1/b")


def test_overwrite_replaces_the_object(store):
    store.write_bytes("k", b"old")
    store.write_bytes("k", b"new!")
    assert store.read_bytes("k") == b"new!"


def test_failing_producer_leaves_no_object_and_no_temporary(store):
    store.write_bytes("run/step-1/x", b"previous")

    def produce(sink):
        sink.write(os.urandom(6 << 20))  # a multipart upload is under way on S3
        raise ValueError("serialiser broke halfway")

    with pytest.raises(ValueError, match="halfway"):
        store.write_atomic("run/step-1/x", produce)
    with pytest.raises(ValueError):
        store.write_atomic("run/step-1/y", produce)
    assert store.read_bytes("run/step-1/x") == b"previous"
    keys = [f.key for f in store.list_files("run")]
    assert keys == ["run/step-1/x"], keys
    assert not any(TMP_MARK in k for k in keys)


def test_direct_write_streams_to_the_final_key_and_hashes(store, backend):
    data = os.urandom(3 * (1 << 20) + 5)
    seen_during = []

    def produce(sink):
        sink.write(data[:1000])
        seen_during.append(store.list_files("run"))
        sink.write(data[1000:])

    res = store.write_direct("run/step-1/a", produce)
    assert (res.size, res.digest) == (len(data), _crc32c_hex(data))
    assert store.read_bytes("run/step-1/a") == data
    assert [f.key for f in store.list_files("run")] == ["run/step-1/a"]  # no temporary, ever
    assert not any(TMP_MARK in f.key for f in seen_during[0])
    if backend.kind == "local":  # the bytes go to the final key itself while streaming
        assert [f.key for f in seen_during[0]] == ["run/step-1/a"]


def test_direct_write_failure_deletes_the_partial_object(store):
    store.write_bytes("run/step-1/x", b"other object")

    def produce(sink):
        sink.write(os.urandom(6 << 20))  # a multipart upload is under way on S3
        raise ValueError("serialiser broke halfway")

    with pytest.raises(ValueError, match="halfway"):
        store.write_direct("run/step-2/x", produce)
    assert [f.key for f in store.list_files("run")] == ["run/step-1/x"]
    assert store.read_bytes("run/step-1/x") == b"other object"


def test_missing_object_is_named(store):
    with pytest.raises(ObjectNotFoundError, match="run/step-9/nope"):
        store.read_bytes("run/step-9/nope")


def test_delete_prefix_and_listing_dirs(store):
    for key in ("r/step-1/a", "r/step-1/b/c", "r/step-2/a"):
        store.write_bytes(key, b"1")
    assert store.list_dir("r") == ["step-1", "step-2"]
    store.delete_prefix("r/step-1")
    assert [f.key for f in store.list_files("r")] == ["r/step-2/a"]
    store.delete("r/step-2/a")
    store.delete("r/step-2/a")  # idempotent
    assert store.list_files("r") == []
    with pytest.raises(InvalidNameError):
        store.delete_prefix("")


def test_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("rel/ckpt")
    assert store.uri == str(tmp_path / "rel" / "ckpt") and store.kind == "local"
    store.write_bytes("a/b", b"x")
    assert (tmp_path / "rel" / "ckpt" / "a" / "b").read_bytes() == b"x"


def test_local_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        open_store(str(tmp_path / "f"))


@pytest.mark.s3
def test_unreachable_store_fails_fast_with_typed_error(s3_server):
    cfg = StoreConfig(s3_endpoint=f"http://127.0.0.1:{free_port()}")
    start = time.perf_counter()
    with pytest.raises(StoreUnreachableError, match=r"s3://bkt/ckpt.*after 3 attempts"):
        open_store("s3://bkt/ckpt", cfg, max_retries=2, connect_timeout_s=0.5, backoff_s=0.01)
    assert time.perf_counter() - start < 5.0


@pytest.mark.s3
def test_bad_credentials_give_access_error(s3_server, s3_iam_auth, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-not-a-real-secret")
    cfg = StoreConfig(s3_endpoint=s3_server.endpoint)
    start = time.perf_counter()
    with s3_iam_auth():
        with pytest.raises(StoreAccessError, match=f"s3://{s3_server.bucket}/ckpt") as err:
            open_store(s3_server.uri("ckpt"), cfg, max_retries=3, backoff_s=0.01)
    assert time.perf_counter() - start < 5.0  # not retried: credentials do not heal
    assert "wJalrXUtnFEMI" not in str(err.value)


@pytest.mark.s3
def test_missing_bucket_is_named(s3_server):
    cfg = StoreConfig(s3_endpoint=s3_server.endpoint)
    with pytest.raises(BucketNotFoundError, match="'no-such-bucket'"):
        open_store("s3://no-such-bucket/ckpt", cfg)
    store = open_store("s3://no-such-bucket/ckpt", cfg, probe=False)
    with pytest.raises(BucketNotFoundError, match="s3://no-such-bucket/ckpt/k"):
        store.write_bytes("k", b"x")


@pytest.mark.s3
def test_store_repr_and_errors_carry_no_secrets(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretValue123")
    store = open_store(s3_server.uri("p"), StoreConfig(s3_endpoint=s3_server.endpoint))
    assert "SuperSecret" not in repr(store) and "testing" not in repr(store)
    assert repr(store).startswith(f"Store(uri='s3://{s3_server.bucket}/p'")
    with pytest.raises(InvalidNameError, match="AWS_"):
        open_store("s3://bkt/p?secret_key=SuperSecretValue123", StoreConfig())


def test_redaction_and_error_classification():
    assert redact_uri("s3://AKIA:secret@bkt/p?secret_key=x") == "s3://bkt/p"
    assert redact_uri("/local/path") == "/local/path"
    cases = {
        "AWS Error NETWORK_CONNECTION during HeadBucket: curlCode: 7": (StoreUnreachableError, True),
        "AWS Error ACCESS_DENIED during HeadBucket operation": (StoreAccessError, False),
        "AWS Error NO_SUCH_BUCKET during CreateMultipartUpload": (BucketNotFoundError, False),
        "AWS Error SLOW_DOWN during PutObject": (StoreUnreachableError, True),
        "disk quota exceeded": (CheckpointError, False),
    }
    for text, expected in cases.items():
        assert classify_os_error(OSError(text)) == expected, text
    assert classify_os_error(FileNotFoundError("x")) == (ObjectNotFoundError, False)


def test_names_with_a_compression_suffix_are_stored_verbatim(store):
    # pyarrow's open_output_stream gzips a path ending in ".gz" unless told not to
    data = b"not gzip at all " * 1000
    for write in (store.write_direct, store.write_atomic):
        res = write("run/step-1/blob.gz", lambda sink: sink.write(data))
        assert (res.size, res.digest) == (len(data), _crc32c_hex(data))
        assert store.read_bytes("run/step-1/blob.gz") == data


def _dirty_pages(fd: int) -> int:
    """Dirty page-cache pages of the open file ``fd``: Linux's cachestat system call (>= 6.5)."""
    import ctypes

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]  # len 0: to the end

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    libc, stat = ctypes.CDLL(None, use_errno=True), Stat()
    if libc.syscall(451, fd, ctypes.byref(Range(0, 0)), ctypes.byref(stat), 0) != 0:  # 451: x86-64 / arm64
        pytest.skip(f"no cachestat here ({os.strerror(ctypes.get_errno())})")
    return stat.dirty


def test_local_file_disk_write_starts_while_it_is_written(tmp_path):
    """LocalFileSync.written() hands what was written to the disk at once (Linux), in groups of at
    least WRITEBACK_MIN_BYTES: the file's dirty pages are gone before finish()'s fsync, where the
    kernel alone would keep them ~30 s."""
    from moetrain.storage.sink import WRITEBACK_MIN_BYTES, LocalFileSync
    if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("sync_file_range is Linux-only (fsync alone is used elsewhere)")
    path = tmp_path / "object"
    path.write_bytes(os.urandom(2 * WRITEBACK_MIN_BYTES))
    fd = os.open(path, os.O_RDONLY)
    try:
        if _dirty_pages(fd) == 0:
            pytest.skip(f"{tmp_path} keeps no dirty pages (no write-back on this file system)")
        sync = LocalFileSync(str(path))
        sync.written(WRITEBACK_MIN_BYTES // 2)  # too little: grouped with what follows
        assert _dirty_pages(fd) > 0
        sync.written(WRITEBACK_MIN_BYTES + WRITEBACK_MIN_BYTES // 2)
        deadline = time.monotonic() + 5.0
        while _dirty_pages(fd) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _dirty_pages(fd) == 0
        sync.finish()
    finally:
        os.close(fd)


@pytest.mark.parametrize("checksum", ["crc32c", "sha256"])
def test_caller_may_reuse_its_buffer_once_write_returns(backend, checksum):
    # large slices are hashed on a helper thread beside the write: write() must not return
    # while that thread still reads the caller's buffer
    store = open_store(backend.uri, backend.store_cfg, checksum=checksum)
    original = os.urandom(20 << 20)
    buf = bytearray(original)

    def produce(sink):
        sink.write(buf)
        buf[:] = bytes(len(buf))  # the caller reuses its buffer at once

    res = store.write_direct("run/step-1/reused", produce)
    expected = _crc32c_hex(original) if checksum == "crc32c" else hashlib.sha256(original).hexdigest()
    assert (res.checksum, res.digest) == (checksum, expected)
    assert store.read_bytes("run/step-1/reused") == original


@pytest.mark.gcs
def test_gcs_endpoint_from_the_emulator_variable(gcs_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    store = open_store(gcs_server.uri("emu"))  # no endpoint in the config
    store.write_bytes("k", b"through STORAGE_EMULATOR_HOST")
    assert store.read_bytes("k") == b"through STORAGE_EMULATOR_HOST" and store.kind == "gcs"


@pytest.mark.gcs
def test_gcs_missing_bucket_and_bad_uris_are_named(gcs_server):
    cfg = StoreConfig(gcs_endpoint=gcs_server.endpoint)
    with pytest.raises(BucketNotFoundError, match="'no-such-bucket'"):
        open_store("gs://no-such-bucket/ckpt", cfg)
    with pytest.raises(InvalidNameError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        open_store(f"gs://{gcs_server.bucket}/p?access_token=secret", cfg)
    with pytest.raises(InvalidNameError, match="no bucket"):
        open_store("gs:///ckpt", cfg)


@pytest.mark.gcs
def test_gcs_unreachable_endpoint_fails_with_typed_error(gcs_server):
    cfg = StoreConfig(gcs_endpoint=f"http://127.0.0.1:{free_port()}")
    start = time.perf_counter()
    with pytest.raises(StoreUnreachableError, match=r"gs://bkt/ckpt.*after 2 attempts"):
        open_store("gs://bkt/ckpt", cfg, max_retries=1, backoff_s=0.01)
    assert time.perf_counter() - start < 15.0
