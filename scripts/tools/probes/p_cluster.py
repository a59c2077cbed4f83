"""Outside probes of the cluster side (issue #23 items 1-3 and the Ray/signal partials).

Each runs the real CLI in a subprocess, as a user meets it: ``moetrain submit`` from a checkout
holding links to a cluster token and an SSH key (against a real ``ray start`` head, reading back
the package the cluster received), ``moetrain train`` beside a ``ray start`` cluster, pointed at a
port that accepts and says nothing, stopped by SIGTERM while connecting or training its tokenizer,
stopped by two SIGINTs, and the embedded Ray's metrics endpoint's address. Ray temp folders are
short ones of the probe's own; every process a probe starts is ended by PID.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path

from scripts.helpers import REPO, free_ports, read_until, silent_server
from scripts.tools.probes import Probe

RAY = str(Path(sys.executable).with_name("ray"))
SMALL = ["--set", "data.max_bytes_per_domain=150000", "--set", "data.vocab_size=300", "--set", "model.dim=32",
         "--set", "model.n_heads=2", "--set", "data.seq_len=32", "--set", "model.max_seq_len=32",
         "--set", "train.eval_batches=1", "--set", "cluster.num_workers=1", "--set", "logging.wandb=disabled"]
# Written at run time (this file is uploaded too): a leak is a hit on these exact strings.
SECRETS = {"raycfg": f"ray-token-{uuid.uuid4().hex}", "stuff": f"ssh-key-{uuid.uuid4().hex}"}
SECRET_FILES = ["deploy/id_dsa", "deploy/KEY.PEM", "deploy/.ENV", ".s3cfg", ".boto", ".pgpass", ".vault-token",
                "infra/terraform.tfstate", "kubeconfig", ".bash_history", "token.json", "k8s/secret.yaml"]


# ---- helpers ----------------------------------------------------------------------------------
def _env(**extra) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _end_processes_naming(text: str) -> None:
    """Terminate, then kill, the processes whose command line names ``text`` (a probe's own Ray
    temp folder), and their children."""
    import psutil

    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(text in a for a in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextmanager
def _ray_head(env: dict, dashboard: bool = False):
    """A real ``ray start --head`` (1 CPU) in a short temp folder; yields (temp, gcs port, dashboard port)."""
    tmp = tempfile.mkdtemp(prefix="pr-", dir="/tmp")
    gcs, dash, metrics, client, agent_http, agent_grpc, nm, om, renv = free_ports(9)  # other Rays may hold defaults
    args = [RAY, "start", "--head", f"--port={gcs}", f"--temp-dir={tmp}/ray", "--num-cpus=1", "--disable-usage-stats",
            f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--object-manager-port={om}", f"--runtime-env-agent-port={renv}"]
    args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"] if dashboard else ["--include-dashboard=false"]
    try:
        proc = subprocess.run(args, env={**env, "TMPDIR": tmp}, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed: {proc.stderr.strip().splitlines()[-1:]}")
        yield tmp, gcs, dash
    finally:
        _end_processes_naming(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _train(tmp: Path, *args, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cluster.cli", "train", *SMALL, "--set", f"logging.out_dir={tmp / 'out'}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, str]:
    """(exit status, stderr); None when it had to be killed after ``timeout_s``."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err


def _summary_state(tmp: Path, run: str) -> str:
    try:
        return json.loads((tmp / "out" / run / "summary.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return "none"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


# ---- 23.1: job upload -------------------------------------------------------------------------
def _checkout_with_links(tmp: Path) -> Path:
    """A git checkout of this repository's files, plus links to a token folder and a key folder
    outside it and secret files under the names the rules missed (all tracked by git)."""
    repo, home = tmp / "checkout", tmp / "home"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(SECRETS["raycfg"])
    (home / "keys").mkdir()
    (home / "keys" / "id_rsa").write_text(SECRETS["stuff"])
    os.symlink(home / ".ray", repo / "raycfg")
    os.symlink(home / "keys", repo / "stuff")
    for rel in SECRET_FILES:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("SECRET-" + rel)
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "p", "GIT_AUTHOR_EMAIL": "p@p", "GIT_COMMITTER_NAME": "p",
               "GIT_COMMITTER_EMAIL": "p@p"}
    for cmd in (["init", "-q"], ["add", "-A", "-f"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, capture_output=True, env=git_env)
    return repo


def _package_of(gcs_port: int, dash_port: int, job_id: str) -> tuple[list[str], bytes]:
    from ray._raylet import GcsClient
    from ray.job_submission import JobSubmissionClient

    uri = JobSubmissionClient(f"http://127.0.0.1:{dash_port}").get_job_info(job_id).runtime_env["working_dir"]
    data = GcsClient(address=f"127.0.0.1:{gcs_port}").internal_kv_get(uri.encode(), None)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [n for n in z.namelist() if not n.endswith("/")], b"".join(z.read(n) for n in z.namelist())


def probe_submit_links_and_count(tmp: Path) -> tuple[bool, str]:
    repo = _checkout_with_links(tmp)
    env = _env()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process reads the package back
    with _ray_head(env, dashboard=True) as (_, gcs, dash):
        for _ in range(12):  # a fresh head's job agent takes a while to register ("No available agent")
            proc = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", "--address",
                                   f"http://127.0.0.1:{dash}", "--no-wait", "--", "--config", "tiny", "--set",
                                   "train.steps=1"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in proc.stderr:
                break
            time.sleep(5)
        job = re.search(r"submitted job (raysubmit_\w+)", proc.stdout)
        count = re.search(r"uploading (\d+) file", proc.stdout)
        if proc.returncode != 0 or not job or not count:
            return False, f"exit {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}"
        names, blob = _package_of(gcs, dash, job.group(1))
        subprocess.run([RAY, "job", "stop", "--address", f"http://127.0.0.1:{dash}", job.group(1)], env=env,
                       capture_output=True, timeout=60)
    leaked = [n for n in names if n.split("/")[0] in SECRETS or n in SECRET_FILES]
    leaked += [k for k, v in SECRETS.items() if v.encode() in blob and k not in leaked]
    printed = int(count.group(1))
    ok = not leaked and printed == len(names)
    return ok, f"printed {printed}, sent {len(names)} files; leaked: {', '.join(leaked[:6]) or 'nothing'}"


def probe_submit_dry_run(tmp: Path) -> tuple[bool, str]:
    repo = _checkout_with_links(tmp)
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", "--dry-run", "--address",
                           "http://127.0.0.1:1", "--", "--config", "tiny"], cwd=repo, env=_env(), capture_output=True,
                          text=True, timeout=120)
    listed = [ln.strip() for ln in proc.stdout.splitlines()[:-1]]
    count = re.search(r"uploading (\d+) file", proc.stdout)
    leaked = [n for n in listed if n.split("/")[0] in SECRETS or n in SECRET_FILES]
    ok = proc.returncode == 0 and count is not None and int(count.group(1)) == len(listed) > 0 and not leaked
    return ok, (f"exit {proc.returncode}, listed {len(listed)} files, count {count.group(1) if count else '-'}; "
                f"leaked: {', '.join(leaked[:4]) or 'nothing'}" if proc.returncode == 0 else
                f"exit {proc.returncode}: {_last_line(proc.stderr)}")


def probe_submit_silent_dashboard(tmp: Path) -> tuple[bool, str]:
    with silent_server() as (port, _):
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "submit", "--address", f"http://127.0.0.1:{port}",
                                 "--", "--config", "tiny"], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        rc, err = _finish(proc, 90)
        took = time.monotonic() - t0
    errors = [ln for ln in err.splitlines() if ln.startswith("moetrain: error:")]
    ok = rc == 2 and len(errors) == 1 and "Traceback" not in err
    return ok, (f"exit {rc} after {took:.0f} s: {errors[0][:110] if errors else _last_line(err)}" if rc is not None
                else f"still waiting after {took:.0f} s, killed")


# ---- 23.2: a `ray start` cluster on the machine --------------------------------------------------
def probe_train_beside_ray_start(tmp: Path) -> tuple[bool, str]:
    env = _env()
    with _ray_head(env) as (rtmp, _, _):
        proc = _train(tmp, "--set", "train.steps=2", "--set", "cluster.run_name=beside", env={**env, "TMPDIR": rtmp})
        rc, err = _finish(proc, 300)
    state = _summary_state(tmp, "beside")
    return rc == 0 and state == "finished", f"exit {rc}, summary {state}: {_last_line(err)}"


# ---- 23.3: waits on an address, stops ---------------------------------------------------------
def probe_silent_address(tmp: Path) -> tuple[bool, str]:
    with silent_server() as (port, _):
        t0 = time.monotonic()
        proc = _train(tmp, "--set", f"cluster.address=127.0.0.1:{port}", "--set", "cluster.connect_timeout_s=5")
        rc, err = _finish(proc, 90)
        took = time.monotonic() - t0
    errors = [ln for ln in err.splitlines() if ln.startswith("moetrain: error:")]
    ok = rc == 2 and len(errors) == 1 and "Traceback" not in err
    return ok, (f"exit {rc} after {took:.0f} s: {errors[0][:120] if errors else _last_line(err)}" if rc is not None
                else f"still waiting after {took:.0f} s (connect_timeout_s=5), killed")


def probe_sigterm_while_connecting(tmp: Path) -> tuple[bool, str]:
    with silent_server() as (port, accepted):
        proc = _train(tmp, "--set", f"cluster.address=127.0.0.1:{port}", "--set", "cluster.connect_timeout_s=600",
                      "--set", "cluster.run_name=conn")
        if not accepted.wait(240):
            proc.kill()
            return False, "never connected"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        rc, err = _finish(proc, 30)
    state = _summary_state(tmp, "conn")
    ok = rc == 3 and state == "stopped" and "Traceback" not in err
    return ok, (f"exit {rc}, summary {state}" if rc is not None else "SIGTERM ignored for 30 s, killed")


def probe_sigterm_during_tokenizer_training(tmp: Path) -> tuple[bool, str]:
    cache = tmp / "cache"
    proc = _train(tmp, "--set", "cluster.run_name=tok", "--set", "data.vocab_size=4096",
                  "--set", "data.max_bytes_per_domain=4000000", env=_env(MOETRAIN_CACHE_DIR=str(cache)))
    deadline = time.monotonic() + 120
    while not (cache / "data").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)  # the corpus is read lazily: this is the tokenizer's training
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc, 120)
    state = _summary_state(tmp, "tok")
    ok = rc == 3 and state == "stopped" and "Traceback" not in err
    return ok, f"exit {rc}, summary {state}: {_last_line(err)}"


def probe_second_sigint(tmp: Path) -> tuple[bool, str]:
    proc = _train(tmp, "--set", "cluster.run_name=twice", "--set", "train.steps=100000", "--set", "train.log_every=1",
                  "--set", f"checkpoint.uri={tmp / 'ckpt'}", "--set", "checkpoint.every=0")
    seen = read_until(proc, "step     3 |", 300)
    proc.send_signal(signal.SIGINT)
    seen += read_until(proc, "stopping after the current step", 120)
    proc.send_signal(signal.SIGINT)
    rc, err = _finish(proc, 120)
    err = seen + err
    state = _summary_state(tmp, "twice")
    tracebacks = err.count("Traceback")
    ok = rc == 3 and state == "stopped" and tracebacks == 0
    return ok, f"exit {rc}, summary {state}, {tracebacks} traceback(s)"


def probe_metrics_endpoint_address(tmp: Path) -> tuple[bool, str]:
    import psutil

    proc = _train(tmp, "--set", "cluster.run_name=metrics", "--set", "train.steps=100000", "--set",
                  "train.log_every=1")
    seen = read_until(proc, "step     2 |", 300)
    port = re.search(r"Prometheus text at http://[\d.]+:(\d+)/metrics", seen)
    bound = sorted({c.laddr.ip for c in psutil.net_connections("tcp")
                    if port and c.status == "LISTEN" and c.laddr.port == int(port.group(1))})
    proc.send_signal(signal.SIGTERM)
    _finish(proc, 120)
    ok = bool(bound) and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in bound)
    return ok, f"metrics port {port.group(1) if port else '?'} listens on {', '.join(bound) or 'nothing seen'}"


PROBES = [
    Probe("submit from a checkout with links to ~/.ray and a key folder, and KEY.PEM/.ENV/... files", "23.1",
          probe_submit_links_and_count),
    Probe("submit --dry-run prints what would be sent", "23.1", probe_submit_dry_run),
    Probe("submit to a dashboard port that accepts and says nothing", "23.3", probe_submit_silent_dashboard),
    Probe("train with a `ray start` cluster on the machine", "23.2", probe_train_beside_ray_start),
    Probe("cluster.address at a port that accepts and says nothing", "23.3", probe_silent_address),
    Probe("SIGTERM while connecting to that port", "23.3", probe_sigterm_while_connecting),
    Probe("SIGTERM during tokenizer training", "23.3", probe_sigterm_during_tokenizer_training),
    Probe("a second SIGINT during the stop", "23.3", probe_second_sigint),
    Probe("the embedded Ray's metrics endpoint address", "23.3", probe_metrics_endpoint_address),
]
