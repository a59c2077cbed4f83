"""`moetrain submit` against a real multi-process Ray cluster (`ray start --head`), as a user runs it.

The module fixture starts a head node on free ports with its own short ``--temp-dir`` and
``RAY_AUTH_MODE=disabled`` (a token created by an earlier local ``ray.init`` would otherwise turn
token auth on and the job API would refuse us). Teardown stops exactly the processes of this
cluster — everything whose command line names our temp dir, and their descendants — instead of
``ray stop``, which stops every Ray instance of the machine (other test sessions' included).

One short training job is submitted through ``cluster.submit.submit`` (the code behind
``moetrain submit``) in a background thread while the main thread scrapes the Prometheus
endpoint of the head node, so both the job's logs and the exported metrics are checked on the
same run.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ports import free_ports

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
METRICS = ["moetrain_loss", "moetrain_tokens_per_s", "moetrain_expert_load_max_over_mean", "moetrain_steps"]


def _cluster_env() -> dict:
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "disabled",
        # Export custom metrics every 0.5 s (default 10 s) so a short job shows up on /metrics.
        "RAY_metrics_report_interval_ms": "500",
        # The job's entrypoint runs `python`: make it this environment's interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    env.pop("RAY_ADDRESS", None)
    return env


def stop_cluster(temp_dir: str, timeout_s: float = 3.0) -> None:
    """Terminate (then kill) this cluster's processes only: cmdline names ``temp_dir``, plus descendants."""
    import psutil

    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(temp_dir in a for a in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    procs = {}
    for p in roots:
        procs[p.pid] = p
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            pass
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_head():
    """A real head node (4 CPUs) on free ports; yields (dashboard_url, metrics_url, temp_dir, gcs_address)."""
    temp_dir = tempfile.mkdtemp(prefix="rmt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, metrics, client, agent_http, agent_grpc, nm, om, renv = free_ports(9)
    cmd = [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--runtime-env-agent-port={renv}",
           "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        proc = subprocess.run(cmd, env=_cluster_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"ray start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        yield f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics", temp_dir, f"127.0.0.1:{gcs}"
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def submitted_job(ray_head, tmp_path_factory):
    """Run one tiny training job through `cluster.submit.submit`, scraping /metrics meanwhile."""
    from cluster.submit import submit

    dashboard, metrics_url = ray_head[:2]
    work = tmp_path_factory.mktemp("submit")
    train_args = ["--", "--config", "tiny", "--set", "train.steps=40", "--set", "train.log_every=10",
                  "--set", "train.eval_every=0", "--set", "train.warmup_steps=2",
                  "--set", "data.max_bytes_per_domain=200000", "--set", "data.vocab_size=300",
                  "--set", "model.dim=32", "--set", "model.ffn_dim=64", "--set", "model.moe.expert_ffn_dim=32",
                  "--set", "cluster.num_workers=1", "--set", "cluster.run_name=submit-test",
                  "--set", f"logging.out_dir={work / 'runs'}", "--set", "logging.wandb=disabled"]
    out = io.StringIO()
    result: dict = {}
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the client side too

    def target():
        t0 = time.perf_counter()
        result["rc"] = submit(train_args, address=dashboard, wait=True, timeout_s=240, out=out,
                              env_vars={"MOETRAIN_CACHE_DIR": str(work / "cache"),
                                        "RAY_AUTH_MODE": "disabled"})
        result["wall_s"] = time.perf_counter() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    seen: set[str] = set()
    pattern = re.compile(r"^(ray_moetrain_\w+?)(?:_total)?\{", re.M)
    try:
        # Gauges vanish from /metrics once the job's driver exits: scrape while it runs, and
        # up to 30 s after (the steps counter stays).
        deadline = None
        while True:
            seen.update(pattern.findall(_scrape(metrics_url)))
            if not thread.is_alive():
                deadline = deadline or time.monotonic() + 30
                if all(f"ray_{m}" in seen for m in METRICS) or time.monotonic() > deadline:
                    break
            time.sleep(0.25)
        thread.join(timeout=300)
    finally:
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old
    return {"rc": result.get("rc"), "logs": out.getvalue(), "metrics": seen, "out_dir": work / "runs" / "submit-test",
            "wall_s": result.get("wall_s"), "package": _package_sent(ray_head, dashboard, out.getvalue())}


def _package_sent(ray_head, dashboard: str, logs: str) -> list[str] | None:
    """The member names of the working_dir package the cluster holds for the submitted job."""
    import zipfile

    from ray._raylet import GcsClient
    from ray.job_submission import JobSubmissionClient

    match = re.search(r"submitted job (raysubmit_\w+)", logs)
    if not match:
        return None
    uri = JobSubmissionClient(dashboard).get_job_info(match.group(1)).runtime_env["working_dir"]
    data = GcsClient(address=ray_head[3]).internal_kv_get(uri.encode(), None)
    return None if data is None else sorted(zipfile.ZipFile(io.BytesIO(data)).namelist())


def test_job_submitted_through_job_api_succeeds_and_logs_training(submitted_job):
    logs = submitted_job["logs"]
    assert submitted_job["rc"] == 0, logs[-4000:]
    assert re.search(r"submitted job (raysubmit_\w+)", logs), logs[:2000]
    assert "python -m cluster.cli train --config tiny" in logs
    steps = re.findall(r"step\s+(\d+) \| loss", logs)
    assert "1" in steps and "40" in steps, logs[-4000:]
    assert "=== moetrain run summary ===" in logs
    assert "SUCCEEDED" in logs.splitlines()[-1]
    # The job ran in the uploaded working_dir, but the outputs went where the config said.
    assert (submitted_job["out_dir"] / "summary.json").exists()


def test_printed_count_is_what_the_cluster_received(submitted_job):
    """The count `moetrain submit` prints is the package the cluster holds, file for file."""
    from cluster.submit import REPO_ROOT
    from cluster.upload import upload_plan

    package = submitted_job["package"]
    assert package, submitted_job["logs"][-2000:]
    printed = int(re.search(r"uploading (\d+) file\(s\)", submitted_job["logs"]).group(1))
    assert printed == len(package)
    assert package == list(upload_plan(REPO_ROOT).uploaded)
    assert "cluster/cli.py" in package and not any(n.startswith((".git/", ".venv")) for n in package)


def test_metrics_endpoint_exports_moetrain_metrics(submitted_job):
    seen = submitted_job["metrics"]
    missing = [m for m in METRICS if f"ray_{m}" not in seen]
    assert not missing, f"missing on /metrics: {missing}; seen: {sorted(seen)}"


def test_unreachable_address_is_one_clear_line(capsys):
    from cluster.submit import submit

    (port,) = free_ports(1)
    rc = submit(["--config", "tiny"], address=f"http://127.0.0.1:{port}", wait=True)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("moetrain: error: cannot reach the Ray dashboard"), err
    assert "Traceback" not in err


def test_entrypoint_and_runtime_env(tmp_path):
    from cluster.submit import entrypoint, runtime_env

    assert entrypoint(["--", "--config", "my cfg.yaml", "--set", "a.b=1"]) == \
        "python -m cluster.cli train --config 'my cfg.yaml' --set a.b=1"
    env = runtime_env(tmp_path / "p.zip", env_vars={"X": 1})
    assert env == {"working_dir": str(tmp_path / "p.zip"), "env_vars": {"X": "1"}}  # no excludes: our zip is the list


def test_a_dashboard_address_that_says_nothing_fails_within_the_timeout(capsys):
    """A port that accepts and never answers: one line, exit 2, within --connect-timeout-s (the
    job client alone waited for minutes)."""
    from cluster.submit import submit

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    try:
        t0 = time.monotonic()
        rc = submit(["--config", "tiny"], address=f"http://127.0.0.1:{srv.getsockname()[1]}", connect_timeout_s=2)
        took = time.monotonic() - t0
    finally:
        srv.close()
    err = capsys.readouterr().err
    assert rc == 2 and took < 10, (rc, took)
    assert err.count("\n") == 1 and "no answer within 2 s" in err, err


def test_submit_job_script_targets_ray_address():
    """scripts/submit_job.sh starts nothing: with nothing at $RAY_ADDRESS it fails in one line."""
    import subprocess

    (port,) = free_ports(1)
    env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{port}", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(["bash", str(REPO / "scripts/submit_job.sh"), "--config", "tiny"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_local_cluster_recipe_runs_with_token_auth(tmp_path):
    """cluster/configs/local_cluster.sh starts a head with token auth on by default: the job API
    refuses a client without the token and serves one that sends it."""
    temp_dir = tempfile.mkdtemp(prefix="rtk-", dir="/tmp")
    home = tmp_path / "home"
    home.mkdir()
    head, dash, metrics = free_ports(3)
    env = _cluster_env()
    env.pop("RAY_AUTH_MODE")  # the recipe's own default
    env.update({"HOME": str(home), "RAY_TMP": temp_dir, "HEAD_PORT": str(head), "DASHBOARD_PORT": str(dash),
                "METRICS_PORT": str(metrics), "HEAD_CPUS": "1"})
    url = f"http://127.0.0.1:{dash}"
    client = f"from ray.job_submission import JobSubmissionClient as C; print(len(C({url!r}).list_jobs()))"
    try:
        proc = subprocess.run(["bash", str(REPO / "cluster" / "configs" / "local_cluster.sh"), "start"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "token auth: RAY_AUTH_MODE=token" in proc.stdout
        token = (home / ".ray" / "auth_token").read_text().strip()
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
        assert denied.value.code == 401
        req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        base = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        with_token = subprocess.run([sys.executable, "-c", client], env={**base, "RAY_AUTH_MODE": "token"},
                                    capture_output=True, text=True, timeout=60)
        assert with_token.returncode == 0 and with_token.stdout.strip() == "0", with_token.stderr[-2000:]
        no_token = subprocess.run([sys.executable, "-c", client], env={**base, "HOME": str(tmp_path)},
                                  capture_output=True, text=True, timeout=60)
        assert no_token.returncode != 0
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
