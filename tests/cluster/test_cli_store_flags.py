"""The store flags of ``moetrain ckpt`` (``--s3-endpoint`` / ``--s3-region`` / ``--gcs-endpoint``,
the same fields as the run config's ``storage`` section) reach the store: a checkpoint on the S3
server is listed through them, and an endpoint holding credentials is refused in one line
without contacting it or repeating the secret."""

from __future__ import annotations

import pytest
import torch

from cluster.cli import main
from moetrain.checkpoint import AsyncCheckpointWriter, commit
from moetrain.config import StoreConfig
from moetrain.storage import open_store


@pytest.mark.s3
def test_ckpt_list_reaches_the_s3_server_through_the_flags(s3_server, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # only the flag names the server
    uri = s3_server.uri("cli-flags")
    store = open_store(uri, StoreConfig(s3_endpoint=s3_server.endpoint))
    with AsyncCheckpointWriter(store, "run") as w:
        commit(store, "run", 3, [w.save(3, {"dense/rank-0": {"w": torch.ones(4)}}).result()])
    assert main(["ckpt", "list", uri, "--s3-endpoint", s3_server.endpoint, "--s3-region", "us-east-1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "step", "committed"]
    assert lines[1].split()[:3] == ["run", "3", "yes"] and lines[1].endswith(f"{uri}/run/step-3")


def test_ckpt_refuses_an_endpoint_flag_with_credentials(capsys):
    code = main(["ckpt", "list", "s3://bucket/ckpt", "--s3-endpoint", "http://AKIAKEYID:TOPSECRET@10.255.255.1:9000"])
    err = capsys.readouterr().err
    assert code == 2 and "holds credentials" in err and "***@10.255.255.1:9000" in err
    assert "AKIAKEYID" not in err and "TOPSECRET" not in err and len(err.strip().splitlines()) == 1
