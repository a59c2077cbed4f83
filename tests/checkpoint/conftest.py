"""Fixtures of the checkpoint tests: a fresh checkpoint root on a local dir or on the S3 server."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from moetrain.checkpoint import Store, open_root
from moetrain.config import CheckpointConfig, StoreConfig


@dataclass(frozen=True)
class Backend:
    kind: str  # local | s3 | gcs
    uri: str  # a fresh checkpoint root
    cfg: CheckpointConfig
    store_cfg: StoreConfig = StoreConfig()  # endpoints of the server (the run's `storage` section)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3),
                        pytest.param("gcs", marks=pytest.mark.gcs)])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        uri = str(tmp_path / "ckpt")
        return Backend("local", uri, CheckpointConfig(uri=uri, max_retries=1))
    if request.param == "gcs":
        gcs = request.getfixturevalue("gcs_server")
        uri = gcs.uri(f"t-{uuid.uuid4().hex[:8]}/ckpt")
        return Backend("gcs", uri, CheckpointConfig(uri=uri, max_retries=1), StoreConfig(gcs_endpoint=gcs.endpoint))
    s3 = request.getfixturevalue("s3_server")
    uri = s3.uri(f"t-{uuid.uuid4().hex[:8]}/ckpt")
    return Backend("s3", uri, CheckpointConfig(uri=uri, max_retries=1),
                   StoreConfig(s3_endpoint=s3.endpoint, s3_region=s3.region))


@pytest.fixture
def store(backend: Backend) -> Store:
    return open_root(backend.uri, backend.cfg, backend.store_cfg, backoff_s=0.01)
