"""Submit ``moetrain train ...`` to a running Ray cluster as a Ray job (the job API).

    moetrain submit --address http://HEAD:8265 -- --config tiny --set train.steps=100
    python -m cluster.cli submit --no-wait -- --config my.yaml

The equivalent raw Ray command (run from the repository root):

    ray job submit --address http://HEAD:8265 --working-dir . --entrypoint-num-cpus 0.5 \\
        -- python -m cluster.cli train --config tiny --set train.steps=100

The repository root is uploaded as the job's ``working_dir`` by allow-list (:mod:`cluster.upload`):
in a git checkout the files git considers, never secrets (``.env``, cloud and SSH credentials,
keys, tokens), data and checkpoints, virtual environments, run outputs or caches, never a link out
of the folder; ``--include PATTERN`` re-admits a path. We pack the zip ourselves and Ray uploads it
as it is, so the list ``--dry-run`` prints is what is sent. The entrypoint runs with it as the
current directory, and the worker actors the job starts inherit the same runtime environment. The
job's driver reaches the cluster through the ``RAY_ADDRESS`` Ray sets for it, so ``moetrain train``
joins the cluster instead of starting a local Ray. ``python`` on the cluster's nodes must be an
environment with moetrain's dependencies installed (the one ``ray start`` ran from).

A cluster with token auth (Ray 2.60 ``RAY_AUTH_MODE=token``) is reached from any host with the
token sent as ``Authorization: Bearer``: ``--token-file FILE`` (e.g. a copy of the head's
``~/.ray/auth_token``, or ``ray get-auth-token`` output), else ``RAY_AUTH_TOKEN``; without either,
Ray's own lookup applies (``RAY_AUTH_MODE=token`` and ``~/.ray/auth_token`` on this host).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from cluster.upload import UploadPlan, upload_plan, write_package

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT_NUM_CPUS = 0.5  # the driver: controller loop, dataset build; the workers reserve their own
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CONNECT_TIMEOUT_S = 30.0  # default bound on reaching the dashboard (the job client itself waits for minutes)


def entrypoint(train_args: list[str]) -> str:
    """``python -m cluster.cli train <args>`` (a leading ``--`` is dropped), shell-quoted."""
    args = list(train_args)
    if args and args[0] == "--":
        args = args[1:]
    return shlex.join(["python", "-m", "cluster.cli", "train", *args])


def runtime_env(package: str | os.PathLike, env_vars: dict[str, str] | None = None) -> dict:
    """The job's runtime_env: ``working_dir`` is the zip :func:`cluster.upload.write_package` built
    (Ray uploads a local zip as it is, without its own file selection)."""
    env: dict = {"working_dir": str(package)}
    if env_vars:
        env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    return env


def print_plan(plan: UploadPlan, out: TextIO) -> None:
    """What ``--dry-run`` prints: every file that goes, then the one-line count."""
    for rel in plan.uploaded:
        print(f"  {rel}", file=out)
    print(f"moetrain: {plan.describe()}", file=out, flush=True)


def resolve_address(address: str | None) -> str:
    """``address``, else ``RAY_ADDRESS`` if it is an HTTP (dashboard) address, else the local default."""
    if address:
        return address if "://" in address else f"http://{address}"
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        return env
    return DEFAULT_ADDRESS


def check_dashboard(url: str, timeout_s: float) -> None:
    """Raise ConnectionError unless an HTTP server answers at ``url`` within ``timeout_s`` (any
    status counts: a 401 is a dashboard asking for Ray's token)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/api/version", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:  # URLError, a timeout, a malformed URL
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"no answer within {timeout_s:g} s ({reason})") from None


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """The job API's auth header: the token in ``token_file``, else ``RAY_AUTH_TOKEN``; {} = none.
    Raises ``OSError`` when ``token_file`` cannot be read, ``ValueError`` when it is empty."""
    token = (
        Path(token_file).expanduser().read_text().strip()
        if token_file
        else os.environ.get("RAY_AUTH_TOKEN", "").strip()
    )
    if token_file and not token:
        raise ValueError(f"token file {token_file} is empty")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _err(msg: str) -> None:
    print(f"moetrain: error: {msg}", file=sys.stderr)


def submit(
    train_args: list[str],
    address: str | None = None,
    wait: bool = True,
    *,
    env_vars: dict[str, str] | None = None,
    working_dir: str | os.PathLike | None = None,
    entrypoint_num_cpus: float = ENTRYPOINT_NUM_CPUS,
    submission_id: str | None = None,
    timeout_s: float | None = None,
    out: TextIO | None = None,
    include: tuple[str, ...] | list[str] = (),
    dry_run: bool = False,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    token_file: str | None = None,
) -> int:
    """Submit ``moetrain train <train_args>`` as a Ray job; print its submission id.

    ``dry_run`` prints the files the job would upload (:func:`print_plan`) and returns 0 without
    contacting the cluster.

    With ``wait`` the job's logs are streamed to ``out`` (stdout) until the job reaches a terminal
    status; returns 0 if it SUCCEEDED, 1 otherwise (or when ``timeout_s`` passes first; the job
    keeps running). Without ``wait`` returns 0 once submitted. An address that does not answer
    within ``connect_timeout_s``, a missing or refused token (``token_file``, else
    ``RAY_AUTH_TOKEN``) or a rejected submission prints one line to stderr and returns 2.
    """
    out = out or sys.stdout
    if dry_run:
        print_plan(upload_plan(working_dir or REPO_ROOT, include), out)
        return 0
    url = resolve_address(address)
    client = _connect(url, token_file, connect_timeout_s)
    if client is None:
        return 2
    ep = entrypoint(train_args)
    plan = upload_plan(working_dir or REPO_ROOT, include)
    print(f"moetrain: {plan.describe()}", file=out, flush=True)
    job_id = _submit_job(client, url, ep, plan, env_vars, entrypoint_num_cpus, submission_id)
    if job_id is None:
        return 2
    print(f"moetrain: submitted job {job_id} to {url}: {ep}", file=out, flush=True)
    if not wait:
        print(
            f"moetrain: follow with `ray job logs --address {url} --follow {job_id}`; "
            f"status with `ray job status --address {url} {job_id}`",
            file=out,
            flush=True,
        )
        return 0
    return _follow(client, url, job_id, out, timeout_s)


def _submit_job(
    client,
    url: str,
    ep: str,
    plan: UploadPlan,
    env_vars: dict[str, str] | None,
    entrypoint_num_cpus: float,
    submission_id: str | None,
) -> str | None:
    """Pack ``plan`` into the job's working_dir zip and submit ``ep``; the job id, or None after
    one line on stderr when the package or the submission fails."""
    with tempfile.TemporaryDirectory(prefix="moetrain-job-") as tmp:
        try:
            package = write_package(plan, Path(tmp) / "working_dir.zip")
            return client.submit_job(
                entrypoint=ep,
                runtime_env=runtime_env(package, env_vars),
                entrypoint_num_cpus=entrypoint_num_cpus,
                submission_id=submission_id,
                metadata={"moetrain": "train"},
            )
        except Exception as exc:
            _err(f"job submission to {url} failed: {_first_line(exc)}")
            return None


def _follow(client, url: str, job_id: str, out: TextIO, timeout_s: float | None) -> int:
    """Stream the job's logs until it ends: 0 if it SUCCEEDED, 1 otherwise (or on timeout), 130
    when interrupted (Ctrl-C stops following, not the job)."""
    try:
        status = wait_for(client, job_id, out=out, timeout_s=timeout_s)
    except KeyboardInterrupt:
        print(
            f"\nmoetrain: stopped following; job {job_id} keeps running "
            f"(stop it with `ray job stop --address {url} {job_id}`)",
            file=out,
            flush=True,
        )
        return 130
    print(f"moetrain: job {job_id} {status}", file=out, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def _connect(url: str, token_file: str | None, connect_timeout_s: float):
    """A ``JobSubmissionClient`` for ``url`` (with the auth token, if any), or None after one line
    on stderr: the job API missing, an unreadable token, or no dashboard answering in time."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        _err(f"the Ray job API is unavailable ({exc}); install ray[default]")
        return None
    try:
        headers = auth_headers(token_file)
    except (OSError, ValueError) as exc:
        _err(f"cannot read the auth token: {exc}")
        return None
    try:
        check_dashboard(url, connect_timeout_s)
        return JobSubmissionClient(url, headers=headers or None)
    except Exception as exc:  # ConnectionError, auth errors, bad scheme...
        _err(f"cannot reach the Ray dashboard at {url}: {_first_line(exc)}")
        return None


def wait_for(client, job_id: str, *, out: TextIO, timeout_s: float | None = None) -> str:
    """Stream the job's logs to ``out`` and return its final status (or the current one on timeout)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.1)
        asyncio.run(asyncio.wait_for(tail(), remaining))
    except asyncio.TimeoutError:
        pass
    except Exception as exc:  # log streaming is best effort: fall back to polling the status
        print(f"moetrain: log streaming stopped ({_first_line(exc)}); polling the job status", file=out, flush=True)
    while True:
        st = client.get_job_status(job_id)
        status = str(getattr(st, "value", st))
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(1.0)
    if status == "FAILED":
        info = client.get_job_info(job_id)
        if info.message:
            print(f"moetrain: {info.message.strip()}", file=out, flush=True)
    return status


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
