"""A newcomer's first run: 2 expert-parallel actors by default, the Ray dashboard on 127.0.0.1
(with the run's rank actors listed while it trains, behind Ray's token auth), what the driver
prints about it, and a heatmap whose axes carry integer layer / expert indices."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cluster.api import parallelism_text
from cluster.telemetry import KEY_METRICS, RayInfo, dashboard_text, heatmap_figure
from moetrain.config import ConfigError, load_config
from scripts.helpers import last_json_line
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
# The smallest model the shipped config can be turned into (as in test_telemetry.py).
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.max_seq_len=32",
        "model.moe.expert_ffn_dim=32", "data.seq_len=32", "data.vocab_size=300",
        "data.max_bytes_per_domain=150000", "train.global_batch_size=8", "train.eval_every=0",
        "train.eval_batches=1", "train.log_every=1", "logging.wandb=disabled", "logging.progress=false"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# ---- defaults and printed text (no Ray) -----------------------------------------------------------
def test_default_run_is_expert_parallel_on_two_actors_that_fit_two_cores():
    c = load_config().cluster
    assert c.num_workers == 2 and c.dashboard and c.dashboard_port == 0
    assert c.num_workers * c.cpus_per_worker <= 2  # `ray start` on a 2-core machine offers 2 CPUs


def test_dashboard_port_out_of_range_names_the_field():
    with pytest.raises(ConfigError, match=r"cluster.dashboard_port \(70000\) must be in \[0, 65535\]"):
        load_config(None, ["cluster.dashboard_port=70000"])


def test_dashboard_text_says_how_to_sign_in_or_that_no_token_is_needed():
    cfg = load_config(None, ["cluster.run_name=demo"])
    on = dashboard_text(RayInfo("http://127.0.0.1:8265", "http://127.0.0.1:9999/metrics", True, True), cfg)
    assert on.startswith("Ray dashboard: http://127.0.0.1:8265")
    assert "get-auth-token`" in on and "no sign-in token" not in on
    assert "moetrain/demo/rank-0 .. rank-1" in on and "http://127.0.0.1:9999/metrics" in on
    assert all(name in on for name in KEY_METRICS)
    off_auth = dashboard_text(RayInfo("http://127.0.0.1:8265", "", False, True), cfg)
    assert "RAY_AUTH_MODE=disabled" in off_auth and "get-auth-token" not in off_auth
    none = dashboard_text(RayInfo("", "", False, True), load_config(None, ["cluster.dashboard=false"]))
    assert none.startswith("Ray dashboard: off (cluster.dashboard=false)") and "Actors tab" not in none


def _metrics(sends: float, world_size: int = 0):
    import numpy as np

    from moetrain.train.metrics import StepMetrics

    return StepMetrics(step=1, loss=1.0, lm_loss=1.0, lbl=0.0, z_loss=0.0, grad_norm=1.0, lr=1e-3, tokens=10,
                       offrank_sends=sends, load_LE=np.zeros((1, 8)), step_time_s=0.1, world_size=world_size)


def test_parallelism_text_names_actors_experts_per_rank_and_traffic():
    two = parallelism_text(load_config(None, ["cluster.run_name=demo"]), [_metrics(1000.0), _metrics(1200.0)])
    assert two.startswith("ran expert-parallel on 2 Ray actors (moetrain/demo/rank-0 .. rank-1)")
    assert "8 experts per MoE layer, 4 per rank" in two and "(1,100 token rows between ranks per step)" in two
    one = parallelism_text(load_config(None, ["cluster.num_workers=1"]), [])
    assert "1 Ray actor" in one and "no expert parallelism" in one
    # an elastic run that ended on 2 of 4 ranks says so (the actors' names no longer follow the ranks)
    cfg4 = load_config(None, ["cluster.run_name=demo", "cluster.num_workers=4", "cluster.min_workers=2"])
    ended = parallelism_text(cfg4, [_metrics(10.0, world_size=4), _metrics(10.0, world_size=2)])
    assert ended.startswith("ran expert-parallel on 2 Ray actors (of 4 asked): 8 experts per MoE layer, 4 per rank")


@pytest.mark.parametrize("layers,experts,y_ticks,x_ticks", [
    (3, 8, [0, 1, 2], list(range(8))),
    (40, 64, list(range(0, 40, 2)), list(range(0, 64, 2))),  # > 32 rows / columns: every 2nd index
])
def test_heatmap_axes_are_integer_layer_and_expert_indices(layers, experts, y_ticks, x_ticks):
    import matplotlib.pyplot as plt

    load = np.arange(layers * experts, dtype=np.float64).reshape(layers, experts) + 1
    fig = heatmap_figure(load, "t")
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        assert ax.get_yticks().tolist() == y_ticks  # imshow row i is centred on y = i
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in y_ticks]
        assert ax.get_xticks().tolist() == x_ticks
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in x_ticks]
        np.testing.assert_allclose(ax.images[0].get_array()[1], load[1] / load[1].sum())  # row 1 = layer 1
    finally:
        plt.close(fig)


def test_rank_actor_repr_names_run_rank_experts_step_and_state():
    """What the Actors tab's Repr column (and Ray's log prefix) shows for a rank: before setup run,
    rank and ``created``; then experts held per layer (4 layers' worth of a 1-rank contiguous
    placement holds all 8 experts), the step and what the rank is doing."""
    from cluster.worker import MoERank

    cfg = load_config(None, TINY + ["cluster.run_name=demo", "cluster.num_workers=1", "cluster.torch_threads=1"])
    w = MoERank(cfg.to_dict(), 0, 1)
    assert repr(w) == "MoERank(run=demo, rank 0 of 1, created)"
    with pytest.raises(RuntimeError, match=r"MoERank\(run=demo, rank 0 of 1, created\): setup\(\) has not run"):
        w.train_step()
    try:
        w.setup("127.0.0.1", free_port(), None)
        assert repr(w) == "MoERank(run=demo, rank 0 of 1, experts per layer 8,8, step 0, idle)"
        seen = []
        w._doing("training", lambda t: seen.append(repr(w)))
        assert seen == ["MoERank(run=demo, rank 0 of 1, experts per layer 8,8, step 0, training)"]
        w.train_step()
        assert repr(w) == "MoERank(run=demo, rank 0 of 1, experts per layer 8,8, step 1, idle)"
    finally:
        w.shutdown()
    assert repr(w).endswith("step 1, shut down)")
    # What the worker group announces at creation (Ray's Repr column is taken then, before setup).
    announced = MoERank(cfg.to_dict(), 1, 2, (3, 5), 12)
    assert repr(announced) == "MoERank(run=demo, rank 1 of 2, experts per layer 3,5, step 12, starting)"


# ---- the dashboard on a real embedded Ray ------------------------------------------------------
def _cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=env, **kw)


def _env(tmp: str, **extra) -> dict:
    env = {**os.environ, "RAY_TMPDIR": tmp, "PYTHONPATH": str(ROOT), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def test_busy_dashboard_port_is_one_clear_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _cli(["train", *_sets(TINY + [f"cluster.dashboard_port={port}", f"logging.out_dir={tmp_path}"])],
                    _env(str(tmp_path), RAY_AUTH_MODE="disabled"), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err[-2000:]
    assert f"moetrain: error: cluster.dashboard_port ({port}) is not free on 127.0.0.1" in err
    assert "Traceback" not in err


@pytest.mark.ray
def test_dashboard_false_starts_no_dashboard(tmp_path):
    port = free_port()
    script = (
        "import json, socket\n"
        "from cluster.api import ensure_ray\n"
        "from cluster.telemetry import dashboard_text\n"
        "from moetrain.config import load_config\n"
        f"cfg = load_config(None, ['cluster.dashboard=false', 'cluster.dashboard_port={port}'])\n"
        "info = ensure_ray(cfg)\n"
        f"refused = socket.socket().connect_ex(('127.0.0.1', {port})) != 0\n"
        "print(json.dumps({'url': info.dashboard_url, 'refused': refused, 'text': dashboard_text(info, cfg)}))\n")
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(ray_tmp, RAY_AUTH_MODE="disabled"),
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json_line(proc.stdout)
    assert out["url"] == "" and out["refused"], out
    assert out["text"].startswith("Ray dashboard: off (cluster.dashboard=false)")


def _get(url: str, token: str | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        return resp.read()


def _wait_for(what: str, check, deadline: float, proc: subprocess.Popen, log: Path):
    while True:
        result = check()
        if result:
            return result
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}; driver output:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _alive_ranks(base: str, token: str, run: str) -> dict[str, tuple[str, str]]:
    """The run's ALIVE actors as the dashboard's Actors tab lists them: name -> (class, repr)."""
    try:
        rows = json.loads(_get(f"{base}/api/v0/actors?limit=1000&detail=1", token))["data"]["result"]["result"]
    except OSError:  # the state API may answer 5xx for a moment while the cluster starts
        return {}
    return {r["name"]: (r["class_name"], r["repr_name"]) for r in rows
            if r["name"].startswith(f"moetrain/{run}/") and r["state"] == "ALIVE"}


def _exports(metrics_url: str, run: str) -> bool:
    """Every metric the driver printed is on the node's Prometheus export, tagged with the run."""
    try:
        lines = _get(metrics_url).decode().splitlines()
    except OSError:
        return False
    return all(any(l.startswith(name + "{") and f'run="{run}"' in l for l in lines) for name in KEY_METRICS)


@pytest.mark.ray
@pytest.mark.slow
def test_dashboard_lists_the_rank_actors_while_training(tmp_path):
    """The default run (2 actors) serves the dashboard on 127.0.0.1 behind token auth; the token
    the printed `ray get-auth-token` gives opens its state API, which lists both rank actors ALIVE;
    the printed metrics are exported; SIGTERM then ends the run cleanly."""
    port, run, token = free_port(), "dash", secrets.token_hex(16)
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    env = _env(ray_tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_metrics_report_interval_ms="1000")
    log = tmp_path / "driver.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the driver
        proc = _cli(["train", *_sets(TINY + ["train.steps=5000", f"cluster.run_name={run}",
                                             f"cluster.dashboard_port={port}", f"logging.out_dir={tmp_path}"])],
                    env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        base = f"http://127.0.0.1:{port}"
        _wait_for("the first step", lambda: re.search(r"step +1 \|", log.read_text()), deadline, proc, log)
        text = log.read_text()
        assert f"Ray dashboard: {base}" in text and "get-auth-token`" in text
        with pytest.raises(urllib.error.HTTPError) as denied:
            _get(f"{base}/api/v0/actors")
        assert denied.value.code == 401
        ray_cli = Path(sys.executable).parent / "ray"
        printed = subprocess.run([str(ray_cli), "get-auth-token"], env=env, capture_output=True, text=True,
                                 timeout=60).stdout.strip()
        assert printed == token
        ranks = _wait_for("both rank actors ALIVE", lambda: _alive_ranks(base, printed, run).keys() == {
            f"moetrain/{run}/rank-0", f"moetrain/{run}/rank-1"}, deadline, proc, log)
        assert ranks and proc.poll() is None  # listed while the run trains
        # Class and Repr columns: Ray takes the repr once, when the actor is made (before setup):
        # the worker group announces the experts each rank will hold (tiny: 8 experts, 2 layers,
        # contiguous over 2 ranks -> 4 per layer) and the step it starts from.
        assert _alive_ranks(base, printed, run) == {
            f"moetrain/{run}/rank-{i}": ("MoERank", f"MoERank(run={run}, rank {i} of 2, experts per layer 4,4, step 0, "
                                                    "starting)") for i in (0, 1)}
        metrics_url = text.split("Prometheus text at ")[1].split(";")[0]
        _wait_for("the printed metrics on /metrics", lambda: _exports(metrics_url, run), deadline, proc, log)
        proc.send_signal(signal.SIGTERM)  # stop after the current step: outputs and summary
        assert proc.wait(timeout=120) == 3, log.read_text()[-4000:]  # 3: stopped early on request
        assert f"ran expert-parallel on 2 Ray actors (moetrain/{run}/rank-0 .. rank-1)" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
