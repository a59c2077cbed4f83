"""A run's driver never hangs on an address, never joins a Ray it was not given, and stops on request.

- ``cluster.address`` at a port that accepts and says nothing: one line, exit 2, within
  ``cluster.connect_timeout_s`` (Ray's own connect loop waited minutes, deaf to SIGTERM);
- SIGTERM while connecting, or while preparing the data: exit 3 and a summary.json (was 143);
- a second SIGINT during the stop: stopped at once, summary.json written, no traceback;
- the embedded Ray starts an instance of its own, bound to 127.0.0.1, even with a ``ray start``
  cluster on the machine (it joined that one and died with a ValueError).
Real processes throughout: the CLI (or a driver script) in a subprocess, a real ``ray start`` head,
a real socket server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.api import check_reachable
from moetrain.config import ConfigError
from scripts.helpers import last_json_line, read_until, silent_server

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
SMALL = ["--set", "data.max_bytes_per_domain=150000", "--set", "data.vocab_size=300", "--set", "model.dim=32",
         "--set", "model.n_heads=2", "--set", "data.seq_len=32", "--set", "model.max_seq_len=32",
         "--set", "train.eval_batches=1", "--set", "cluster.num_workers=1", "--set", "logging.wandb=disabled"]


@pytest.fixture
def silent_port():
    """A TCP server on 127.0.0.1 that accepts connections and never says anything."""
    with silent_server() as (port, _):
        yield port


def _env(**extra) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _train(tmp_path, *args, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cluster.cli", "train", *SMALL, "--set", f"logging.out_dir={tmp_path / 'out'}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _summary(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "out" / name / "summary.json").read_text())


def test_check_reachable_is_bounded_and_knows_a_ray_cluster(silent_port, ray_local):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"accepts connections but does not answer as a Ray cluster within 1.5 s"):
        check_reachable(f"127.0.0.1:{silent_port}", 1.5)
    assert time.monotonic() - t0 < 4
    check_reachable(ray_local.get_runtime_context().gcs_address, 10)  # a real GCS answers at once


@pytest.mark.ray
def test_an_address_that_is_not_ray_fails_in_one_line_within_the_timeout(tmp_path, silent_port):
    proc = _train(tmp_path, "--set", f"cluster.address=127.0.0.1:{silent_port}", "--set", "cluster.connect_timeout_s=3")
    out, err = proc.communicate(timeout=120)  # Ray's own loop: minutes
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("moetrain: error:")]
    assert len(errors) == 1 and "does not answer as a Ray cluster within 3 s (cluster.connect_timeout_s)" in errors[0]
    assert "Traceback" not in err


@pytest.mark.ray
def test_sigterm_while_connecting_stops_with_a_summary(tmp_path, silent_port):
    proc = _train(tmp_path, "--set", f"cluster.address=127.0.0.1:{silent_port}",
                  "--set", "cluster.connect_timeout_s=300", "--set", "cluster.run_name=conn")
    head = read_until(proc, "connecting to the Ray cluster")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, head + err[-3000:]
    assert time.monotonic() - t0 < 30
    assert "STOPPED at step 0" in err and "Traceback" not in err
    s = _summary(tmp_path, "conn")
    assert s["state"] == "stopped" and s["stopped_during"] == "connecting to Ray" and s["steps"] == 0


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_while_preparing_the_data_stops_with_a_summary(tmp_path):
    """A cold cache: the data is read and the tokenizer trained when the signal comes (was: 143)."""
    proc = _train(tmp_path, "--set", "cluster.run_name=prep", "--set", "data.vocab_size=4096",
                  "--set", "data.max_bytes_per_domain=4000000", env=_env(MOETRAIN_CACHE_DIR=str(tmp_path / "cache")))
    head = read_until(proc, "preparing the data")
    time.sleep(0.7)  # into the tokenizer's training (a signal there is seen when it returns)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, head + err[-3000:]
    assert "Traceback" not in err
    s = _summary(tmp_path, "prep")
    assert s["state"] == "stopped" and s["stopped_during"] == "preparing the data"
    assert "stopped by SIGTERM while preparing the data" in s["error"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_sigint_during_the_stop_stops_at_once_with_a_summary(tmp_path):
    proc = _train(tmp_path, "--set", "cluster.run_name=twice", "--set", "train.steps=100000",
                  "--set", "train.log_every=1", "--set", f"checkpoint.uri={tmp_path / 'ckpt'}",
                  "--set", "checkpoint.every=0")
    head = read_until(proc, "step     3 |")
    proc.send_signal(signal.SIGINT)
    head += read_until(proc, "stopping after the current step")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = head + err
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    s = _summary(tmp_path, "twice")
    assert s["state"] == "stopped" and s["steps"] >= 3
    assert "during the stop: stopped at once, without a final evaluation or checkpoint" in s["error"]
    assert not list((tmp_path / "ckpt").glob("twice/step-*/manifest.json"))  # no final checkpoint


LISTENERS = """
import json, sys, psutil, ray
from cluster.api import run
from moetrain.config import load_config
cfg = load_config("tiny", sys.argv[1:])
seen = {}

def snapshot(m):  # while the run trains: every listening socket of this run's Ray processes
    if seen:
        return
    node = ray._private.worker._global_node
    session = node.get_session_dir_path()
    pids = {p.pid for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])}
    pids |= {psutil.Process().pid} | {c.pid for c in psutil.Process().children(recursive=True)}
    seen["listen"] = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                             if c.status == "LISTEN" and c.pid in pids})
    seen["gcs"], seen["metrics_port"] = node.gcs_address, node.metrics_export_port

result = run(cfg, on_step=snapshot, raise_on_failure=False)
print(json.dumps({**seen, "state": result.state.value}))
sys.exit(0 if result.state.value == "finished" else 1)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_ray_never_joins_a_ray_start_cluster_and_binds_loopback(tmp_path):
    """``ray start`` records its address in Ray's temp folder, where ``ray.init()`` looks first;
    TMPDIR points both at a folder of this test's own."""
    from tests.cluster.test_submit import stop_cluster
    from tests.ports import free_ports

    tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = _env(TMPDIR=tmp, MOETRAIN_CACHE_DIR=os.environ.get("MOETRAIN_CACHE_DIR", str(tmp_path / "cache")))
    (gcs,) = free_ports(1)
    try:
        started = subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--temp-dir={tmp}/ray", "--num-cpus=1",
                                  "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-2000:]
        assert (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{gcs}")
        args = [a for a in SMALL if a != "--set"] + ["train.steps=2", "cluster.run_name=beside",
                                                      f"logging.out_dir={tmp_path / 'out'}"]
        proc = subprocess.run([sys.executable, "-c", LISTENERS, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]  # it trained to the end
        assert "Connecting to existing Ray cluster" not in proc.stderr and "Traceback" not in proc.stderr
        assert _summary(tmp_path, "beside")["state"] == "finished"
        seen = last_json_line(proc.stdout)
        assert not seen["gcs"].endswith(f":{gcs}")  # an instance of its own
        assert seen["gcs"].startswith("127.0.0.1:")
        assert seen["metrics_port"] in {port for _, port in seen["listen"]}
        assert {ip for ip, _ in seen["listen"]} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, seen["listen"]
    finally:
        stop_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
