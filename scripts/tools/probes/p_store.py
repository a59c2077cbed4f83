"""Outside probes of the data, checkpoint store and config (issue #23, items 4, 5 and 7), each as a
user meets it: the real CLI or the driver's data preparation in a subprocess."""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

from scripts.helpers import REPO, last_json_line
from scripts.tools.probes import Probe

_PREPARE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from moetrain.config import DataConfig
from moetrain.data.training import prepare_local
t0 = time.perf_counter()
prepare_local(DataConfig(source="paths", paths=["big=" + sys.argv[2]], cache_dir=sys.argv[3]))
print(json.dumps({"s": time.perf_counter() - t0, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _prepare(tmp: Path, path: Path, timeout: float) -> dict | str:
    try:
        proc = subprocess.run([sys.executable, "-c", _PREPARE, str(REPO), str(path), str(tmp / "cache")],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"still preparing after {timeout:.0f} s"
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    return last_json_line(proc.stdout)


def _cli(tmp: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="disabled", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("moetrain: error:")]
    return lines[0] if len(lines) == 1 and "Traceback" not in proc.stderr else ""


def long_line_tokenizer(tmp: Path) -> tuple[bool, str]:
    f = tmp / "line.txt"
    f.write_text("".join(random.Random(0).choices(string.ascii_letters, k=3_000_000)))
    out = _prepare(tmp, f, timeout=120)
    if isinstance(out, str):
        return False, out
    return out["s"] < 60, f"3 MB line without whitespace prepared in {out['s']:.1f} s, peak {out['rss_mb']:.0f} MB"


def huge_file_capped(tmp: Path) -> tuple[bool, str]:
    f = tmp / "huge.txt"
    with open(f, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GB, sparse: no disk used
    out = _prepare(tmp, f, timeout=300)
    if isinstance(out, str):
        return False, out
    return out["rss_mb"] < 600, f"1 GB file, default cap: {out['s']:.1f} s, peak {out['rss_mb']:.0f} MB (was 2.5 GB)"


def second_writer_refused(tmp: Path) -> tuple[bool, str]:
    sys.path.insert(0, str(REPO))
    from moetrain.checkpoint import Lease, open_store

    holder = Lease(open_store(str(tmp / "store")), "twin", ttl_s=60.0).acquire()
    try:
        t0 = time.perf_counter()
        proc = _cli(tmp, "train", "--set", f"checkpoint.uri={tmp / 'store'}", "--set", "cluster.run_name=twin",
                    "--set", "data.max_bytes_per_domain=100000", "--set", "data.vocab_size=300",
                    "--set", f"data.cache_dir={tmp / 'cache'}", "--set", f"logging.out_dir={tmp / 'out'}")
        line = _one_line_error(proc)
        holder.verify()
    finally:
        holder.release()
    ok = proc.returncode == 2 and "being written by another run" in line
    return ok, f"exit {proc.returncode} in {time.perf_counter() - t0:.0f} s: {line[:140] or proc.stderr[-200:]}"


def duplicate_yaml_key(tmp: Path) -> tuple[bool, str]:
    cfg = tmp / "dup.yaml"
    cfg.write_text("train:\n  steps: 3\n  lr: 0.001\n  steps: 5\n")
    proc = _cli(tmp, "train", "--config", str(cfg), timeout=120)
    line = _one_line_error(proc)
    return proc.returncode == 2 and "train.steps" in line, f"exit {proc.returncode}: {line[:140]}"


def credentials_in_endpoint(tmp: Path) -> tuple[bool, str]:
    t0 = time.perf_counter()
    proc = _cli(tmp, "train", "--set", "checkpoint.uri=s3://bucket/ckpt",
                "--set", "storage.s3_endpoint=http://AKIAPROBEKEY:PROBESECRET@10.255.255.1:9000", timeout=120)
    line = _one_line_error(proc)
    leaked = "AKIAPROBEKEY" in proc.stderr + proc.stdout or "PROBESECRET" in proc.stderr + proc.stdout
    ok = proc.returncode == 2 and "holds credentials" in line and not leaked
    return ok, f"exit {proc.returncode} in {time.perf_counter() - t0:.1f} s, secret echoed: {leaked}: {line[:120]}"


def _small_run(tmp: Path, *extra: str) -> list[str]:
    return ["train", "--set", f"checkpoint.uri={tmp / 'store'}", "--set", "cluster.run_name=small",
            "--set", "data.max_bytes_per_domain=150000", "--set", "data.vocab_size=300",
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", f"logging.out_dir={tmp / 'out'}",
            "--set", "train.eval_every=0", "--set", "train.eval_batches=1", *extra]


def corrupt_resume(tmp: Path) -> tuple[bool, str]:
    first = _cli(tmp, *_small_run(tmp, "--set", "train.steps=4", "--set", "checkpoint.every=2"), timeout=600)
    if first.returncode != 0:
        return False, f"the first run failed (exit {first.returncode}): {first.stderr[-200:]}"
    obj = next(p for p in sorted((tmp / "store" / "small" / "step-4").rglob("*"))
               if p.is_file() and p.name != "manifest.json")
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    t0 = time.perf_counter()
    proc = _cli(tmp, *_small_run(tmp, "--set", "train.steps=6", "--resume", "latest"), timeout=600)
    seconds, line = time.perf_counter() - t0, _one_line_error(proc)
    before_ray = "Started a local Ray instance" not in proc.stderr
    ok = proc.returncode == 2 and "step-4: corrupt" in line and "newest intact committed step is" in line \
        and line.rstrip().endswith("small/step-2") and before_ray
    return ok, f"exit {proc.returncode} in {seconds:.0f} s, before Ray: {before_ray}: {line[:60]}..{line[-60:]}"


def stopped_run_releases_name(tmp: Path) -> tuple[bool, str]:
    import signal

    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="disabled", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *_small_run(tmp, "--set", "train.steps=100000",
                                                                               "--set", "checkpoint.every=5")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lease, latest = tmp / "store" / "small" / "lease.json", tmp / "store" / "small" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # until training runs (a first checkpoint committed)
    held = lease.exists()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        return False, "still running 300 s after SIGTERM"
    ok = held and proc.returncode == 3 and not lease.exists()
    return ok, f"lease seen while running: {held}; SIGTERM -> exit {proc.returncode}, lease left: {lease.exists()}"


PROBES = [
    Probe("3 MB line without whitespace, tokenizer + packing", "23.4", long_line_tokenizer),
    Probe("1 GB text file under the default data cap", "23.4", huge_file_capped),
    Probe("moetrain train with a run name another run holds", "23.5", second_writer_refused),
    Probe("a run stopped by SIGTERM gives its name back", "23.5", stopped_run_releases_name),
    Probe("resume onto a corrupted object of the latest step", "23.7", corrupt_resume),
    Probe("a key given twice in the YAML config", "23.7", duplicate_yaml_key),
    Probe("credentials inside storage.s3_endpoint", "23.7", credentials_in_endpoint),
]
