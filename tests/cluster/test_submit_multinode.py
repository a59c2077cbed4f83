"""`moetrain submit` to a multi-node cluster with token auth, as from another host: the local
recipe's multi-node mode (a head and two worker nodes, each `ray start` with its own temp dir),
the token sent from a file (the client has no RAY_AUTH_MODE and no ~/.ray token of the cluster),
and the job's ranks placed on the worker nodes, one each."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from cluster.submit import submit
from tests.cluster.test_submit import REPO, _cluster_env, stop_cluster
from tests.ports import free_ports

pytestmark = [pytest.mark.ray, pytest.mark.multinode, pytest.mark.slow]


def test_submit_with_token_to_recipe_multinode_cluster(tmp_path, capsys):
    temp_dir = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")
    home = tmp_path / "home"
    home.mkdir()
    head, dash, metrics = free_ports(3)
    env = _cluster_env()
    env.pop("RAY_AUTH_MODE")  # the recipe's default: token auth on
    env.update({"HOME": str(home), "RAY_TMP": temp_dir, "HEAD_PORT": str(head), "DASHBOARD_PORT": str(dash),
                "METRICS_PORT": str(metrics), "HEAD_CPUS": "1"})
    url = f"http://127.0.0.1:{dash}"
    old_mode = os.environ.pop("RAY_AUTH_MODE", None)  # the client: no auth mode of its own
    try:
        proc = subprocess.run(["bash", str(REPO / "cluster" / "configs" / "local_cluster.sh"), "multinode", "2", "1"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert sorted(os.listdir(temp_dir)).count("w1") == 1 and "w2" in os.listdir(temp_dir)  # own temp dirs
        token_file = tmp_path / "token"
        token_file.write_text((home / ".ray" / "auth_token").read_text())
        train = ["--", "--config", "tiny", "--set", "train.steps=3", "--set", "train.eval_every=0",
                 "--set", "cluster.num_workers=2", "--set", "cluster.placement_strategy=STRICT_SPREAD",
                 "--set", "cluster.run_name=submit-mn", "--set", f"logging.out_dir={tmp_path / 'runs'}",
                 "--set", "logging.wandb=disabled", "--set", "cluster.start_timeout_s=120"]
        bad = tmp_path / "bad-token"
        bad.write_text("not-the-token")
        assert submit(train, address=url, wait=False, token_file=str(bad), out=io.StringIO()) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"moetrain: error: cannot reach the Ray dashboard at {url}"), err
        out = io.StringIO()
        rc = submit(train, address=url, wait=True, timeout_s=400, out=out, token_file=str(token_file),
                    env_vars={"MOETRAIN_CACHE_DIR": os.environ.get("MOETRAIN_CACHE_DIR", str(tmp_path / "cache")),
                              "RAY_AUTH_MODE": "token"})
        logs = out.getvalue()
        assert rc == 0, logs[-3000:]
        # the ranks ran on the two worker nodes, one each: the job's driver holds 0.5 of the head's
        # single CPU (it runs there, so the head's agent can stream its log), no rank fits beside it
        assert "2 rank(s) on 2 node(s)" in logs, logs[-3000:]
        summary = json.loads((tmp_path / "runs" / "submit-mn" / "summary.json").read_text())
        assert summary["state"] == "finished" and summary["node_of_rank"] == [0, 1]
        assert len({r["node_id"] for r in summary["ranks"]}) == 2
    finally:
        if old_mode is not None:
            os.environ["RAY_AUTH_MODE"] = old_mode
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
