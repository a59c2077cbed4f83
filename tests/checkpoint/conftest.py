"""Fixtures of the checkpoint tests: a fresh checkpoint root on a local dir or on the S3 server."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from moetrain.checkpoint import Store, open_store
from moetrain.config import CheckpointConfig


@dataclass(frozen=True)
class Backend:
    kind: str  # local | s3 | gcs
    uri: str  # a fresh checkpoint root
    cfg: CheckpointConfig


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3),
                        pytest.param("gcs", marks=pytest.mark.gcs)])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        uri = str(tmp_path / "ckpt")
        return Backend("local", uri, CheckpointConfig(uri=uri, max_retries=1))
    if request.param == "gcs":
        gcs = request.getfixturevalue("gcs_server")
        uri = gcs.uri(f"t-{uuid.uuid4().hex[:8]}/ckpt")
        return Backend("gcs", uri, CheckpointConfig(uri=uri, gcs_endpoint=gcs.endpoint, max_retries=1))
    s3 = request.getfixturevalue("s3_server")
    uri = s3.uri(f"t-{uuid.uuid4().hex[:8]}/ckpt")
    return Backend("s3", uri, CheckpointConfig(uri=uri, s3_endpoint=s3.endpoint,
                                               s3_region=s3.region, max_retries=1))


@pytest.fixture
def store(backend: Backend) -> Store:
    return open_store(backend.uri, backend.cfg, backoff_s=0.01)
