"""The Python API for driver scripts: build a config, run it on Ray, read the results.

    from cluster.api import load_config, run
    cfg = load_config("tiny", ["train.steps=50", "cluster.num_workers=2"])
    result = run(cfg)                  # starts an embedded local Ray, or joins RAY_ADDRESS
    print(result.summary["val_loss"], result.history[-1].loss)

Owns: getting the driver onto Ray (an embedded local instance of its own, bound to 127.0.0.1, or
the cluster that ``cluster.address`` / ``RAY_ADDRESS`` names, reached within
``cluster.connect_timeout_s``), saying where the run can be watched, and running the controller.
SIGINT / SIGTERM end a run STOPPED with a summary at any point (:mod:`cluster.stop`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from cluster.checkpointing import acquire_lease, check_fresh_run, check_resume, check_store_writable
from cluster.orphans import reap_orphans
from cluster.controller import Controller
from cluster.runstate import RunFailed, RunResult, State
from cluster.memory import check_fits, with_vocab
from cluster.stop import StopGuard, StopRequested
from cluster.telemetry import RayInfo, dashboard_text, write_summary
from moetrain.config import ConfigError, RunConfig, load_config
from moetrain.train.zero import check_zero_supported
from moetrain.precision import check_run_precision
from moetrain.train.metrics import StepMetrics

__all__ = ["load_config", "run", "ensure_ray", "parallelism_text", "RayInfo", "RunResult", "RunFailed", "State"]

log = logging.getLogger("moetrain")

DASHBOARD_HOST = "127.0.0.1"  # the embedded dashboard is reachable from this machine only
DRIVER_CPUS = 1  # logical CPUs kept for the driver when sizing an embedded local Ray


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` unless a Ray cluster answers at the ``HOST:PORT`` address: a TCP
    connection, then gRPC's health check, which Ray's GCS serves (``ray.init`` itself retries for
    minutes against a port that accepts and says nothing, deaf to signals while it does).
    ``ray://`` and ``auto`` addresses are left to Ray."""
    from moetrain.config import _host_port

    if address.startswith(("ray://", "auto")):
        return
    hp = _host_port(address)
    if hp is None:
        raise ConfigError(f"Ray address {address!r} must be HOST:PORT, ray://HOST:PORT or auto")
    deadline = time.monotonic() + timeout_s
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} within {timeout_s:g} s (cluster.connect_timeout_s): {exc}"
        ) from None
    _check_gcs_answers(address, deadline, timeout_s)


GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # request b"" (all services); Ray's GCS answers SERVING


def _check_gcs_answers(address: str, deadline: float, timeout_s: float) -> None:
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=max(deadline - time.monotonic(), 0.01))
        channel.unary_unary(GRPC_HEALTH_CHECK)(b"", timeout=max(deadline - time.monotonic(), 0.01))
    except grpc.FutureTimeoutError:
        raise ConfigError(
            f"{address} accepts connections but does not answer as a Ray cluster within "
            f"{timeout_s:g} s (cluster.connect_timeout_s): is it the head's GCS port "
            "(ray start --port, default 6379)?"
        ) from None
    except grpc.RpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
            raise ConfigError(
                f"{address} does not answer as a Ray cluster within {timeout_s:g} s "
                f"(cluster.connect_timeout_s): gRPC {code.name}"
            ) from None
        # anything else (e.g. UNAUTHENTICATED under token auth) is a Ray GCS speaking: Ray says the rest
    finally:
        channel.close()


def check_out_dir(cfg: RunConfig) -> None:
    """The run's output folder can be created and written (else one line naming logging.out_dir)."""
    from pathlib import Path

    out = Path(cfg.logging.out_dir).expanduser() / cfg.cluster.run_name
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"logging.out_dir ({cfg.logging.out_dir!r}) is not writable: {exc.strerror or exc} ({out})"
        ) from None


def ensure_ray(cfg: RunConfig) -> RayInfo:
    """Join ``cluster.address`` / ``RAY_ADDRESS``, or start an embedded local Ray (with the
    dashboard on 127.0.0.1 unless ``cluster.dashboard=false``). Returns where to watch it."""
    import ray

    if ray.is_initialized():
        return _ray_info(None, embedded=False)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info(
            "connecting to the Ray cluster at %s (within cluster.connect_timeout_s=%g s)",
            address,
            cfg.cluster.connect_timeout_s,
        )
        check_reachable(address, cfg.cluster.connect_timeout_s)
        with StopGuard.keep():  # ray.init sets its own SIGTERM handler
            ctx = ray.init(address=address, namespace="moetrain", log_to_driver=True)
        return _ray_info(ctx, embedded=False)
    c = cfg.cluster
    reaped = reap_orphans()  # agents a killed earlier driver left behind (they hold ports and memory)
    if reaped:
        log.info(
            "ended %d Ray agent process(es) orphaned by a killed earlier run: %s",
            len(reaped),
            ", ".join(f"{o.name} (pid {o.pid})" for o in reaped),
        )
    if c.dashboard and c.dashboard_port:
        _check_port_free(c.dashboard_port)
    # Logical CPUs: never fewer than the group needs, so 2 workers also start on a 2-core machine.
    need = c.num_workers * c.cpus_per_worker + DRIVER_CPUS
    # address="local": a new instance of our own, never a `ray start` cluster found on this machine.
    with _loopback_node(), StopGuard.keep():
        ctx = ray.init(
            address="local",
            num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
            namespace="moetrain",
            include_dashboard=c.dashboard,
            dashboard_host=DASHBOARD_HOST,
            dashboard_port=c.dashboard_port or None,
            log_to_driver=True,
            configure_logging=False,
        )
    return _ray_info(ctx, embedded=True)


@contextmanager
def _loopback_node():
    """Start the embedded Ray's node on 127.0.0.1: Ray then binds every port it opens (GCS, raylet,
    workers, and the metrics endpoint, which answers without Ray's token) to loopback instead of all
    interfaces. Ray does so when its multi-machine mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``,
    read once at import, hence the module constant); it is read only when a node's address is
    chosen."""
    from ray._private import ray_constants

    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray checks it
        try:
            s.bind((DASHBOARD_HOST, port))
        except OSError as exc:
            raise ConfigError(
                f"cluster.dashboard_port ({port}) is not free on {DASHBOARD_HOST} ({exc.strerror}): choose "
                "another port, 0 for 8265 or the next free one, or cluster.dashboard=false"
            ) from None


def _ray_info(ctx, *, embedded: bool) -> RayInfo:
    """Read the dashboard and metrics addresses from ``ray.init``'s context (or, for a Ray that
    someone else started in this process, from the connected node)."""
    if ctx is not None:
        url, metrics_port = ctx.dashboard_url or "", ctx.address_info.get("metrics_export_port")
    else:
        try:
            from ray._private import worker as ray_worker  # no public getter once ray.init returned

            url = ray_worker.get_dashboard_url() or ""
            metrics_port = getattr(ray_worker._global_node, "metrics_export_port", None)
        except Exception:  # best effort: only what is printed depends on it
            url, metrics_port = "", None
    if url and "://" not in url:
        url = "http://" + url
    metrics_url = f"http://{DASHBOARD_HOST}:{metrics_port}/metrics" if embedded and metrics_port else ""
    return RayInfo(dashboard_url=url, metrics_url=metrics_url, token_auth=_token_auth(), embedded=embedded)


def _token_auth() -> bool:
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # Ray sets RAY_AUTH_MODE=token in this process when it turns token auth on
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return bool(is_token_auth_enabled())


def parallelism_text(cfg: RunConfig, history: list[StepMetrics]) -> str:
    """One line for the end of a run: how the experts were spread over the Ray actors."""
    c, moe = cfg.cluster, cfg.model.moe
    if c.num_workers == 1:
        return (
            f"ran on 1 Ray actor (moetrain/{c.run_name}/rank-0) holding all {moe.num_experts} experts of "
            "each MoE layer: no expert parallelism (set cluster.num_workers >= 2)"
        )
    n = (history[-1].world_size if history else 0) or c.num_workers  # an elastic run's size at the end
    slots = cfg.placement.slots_per_rank or moe.num_experts // n
    sends = [h.offrank_sends for h in history]
    traffic = f" ({sum(sends) / len(sends):,.0f} token rows between ranks per step)" if sends else ""
    who = f"moetrain/{c.run_name}/rank-0 .. rank-{n - 1}" if n == c.num_workers else f"of {c.num_workers} asked"
    return (
        f"ran expert-parallel on {n} Ray actors ({who}): {moe.num_experts} experts per MoE layer, {slots} per "
        f"rank, tokens exchanged by all-to-all{traffic}"
    )


def run(cfg: RunConfig, *, on_step=None, raise_on_failure: bool = True) -> RunResult:
    """Run training to the end (or to FAILED). ``on_step(metrics)`` is called on the driver. A
    SIGINT / SIGTERM ends it STOPPED, with a summary.json, whatever it is doing (:mod:`cluster.stop`)."""
    logging.getLogger("moetrain").setLevel(logging.INFO)
    phase = _Phase()
    with StopGuard.install() as guard:
        try:
            return _run(cfg, on_step, raise_on_failure, phase)
        except StopRequested as exc:
            guard.caught()
            return _stopped_before_training(cfg, exc, phase)


class _Phase:
    """What the driver is doing before the controller runs (named in a stop's summary)."""

    def __init__(self) -> None:
        self.t0, self.name = time.perf_counter(), "checking the config"

    def __call__(self, name: str) -> None:
        self.name = name


def _run(cfg: RunConfig, on_step, raise_on_failure: bool, phase: _Phase) -> RunResult:
    from moetrain.data.training import open_training_data

    check_run_precision(cfg.train.precision, cfg.cluster.use_gpu)  # bf16 without native bf16: exit 2
    from moetrain.hf.load import resolve_init_from
    from moetrain.train.trainer import check_vocab

    cfg = resolve_init_from(cfg)  # model.init_from=hf:DIR fixes the model's shape (and the placement's)
    # Prepare (or find in the cache) the data and read its manifest on the driver first: bad data
    # fails fast with a clear error before any actor starts, and the workers then stream it.
    phase("preparing the data")
    log.info(
        "run %s: preparing the data (data.source=%s; cached after the first run)", cfg.cluster.run_name, cfg.data.source
    )
    dataset = open_training_data(cfg.data, cfg.train.global_batch_size, cfg.storage)
    phase("checking the run")
    check_vocab(cfg, dataset.vocab_size)
    check_out_dir(cfg)
    check_zero_supported(cfg.train.zero_stage)  # DeepSpeed present for ZeRO 1/2
    check_store_writable(cfg)  # seconds, before any actor: a read-only store is a user error
    lease = acquire_lease(cfg)  # one writer per run name in the store (a live one elsewhere: exit 2)
    try:
        check_fresh_run(cfg)  # never mix two lineages under one run name
        check_resume(cfg)  # the step to resume is intact, else exit 2 naming the newest intact one
        phase("connecting to Ray")
        log.info(dashboard_text(ensure_ray(cfg), cfg))
        phase("starting the run")
        # before any actor: a run the memory planner says cannot fit is refused (one line, exit 2)
        plan = check_fits(with_vocab(cfg, dataset.vocab_size))
        result = Controller(cfg, on_step=on_step, memory_plan=plan.to_dict(), lease=lease).run()
    finally:
        if lease is not None:
            lease.release()  # finished, failed or stopped
    if result.state == State.FAILED and raise_on_failure:
        raise RunFailed(f"run {cfg.cluster.run_name} failed:\n{result.error}")
    if result.state in (State.FINISHED, State.STOPPED):
        log.info(parallelism_text(cfg, result.history))
    return result


def _stopped_before_training(cfg: RunConfig, exc: StopRequested, phase: _Phase) -> RunResult:
    """A stop before the controller loop: summary.json says so (state stopped, no step trained)."""
    error = f"{exc} while {phase.name}, before training started"
    log.warning("run %s: %s", cfg.cluster.run_name, error)
    summary: dict[str, object] = {
        "run_name": cfg.cluster.run_name,
        "run_id": None,
        "state": State.STOPPED.value,
        "error": error,
        "stopped_during": phase.name,
        "num_workers": cfg.cluster.num_workers,
        "steps": 0,
        "stopped_at_step": 0,
        "wall_s": time.perf_counter() - phase.t0,
        "restarts": 0,
        "skipped_steps": 0,
        "checkpoints_committed": 0,
        "checkpoints_failed": 0,
        "checkpoint_failures": [],
        "memory_plan": None,
    }
    try:
        write_summary(Path(cfg.logging.out_dir).expanduser().resolve() / cfg.cluster.run_name, summary)
    except OSError as err:
        log.warning("could not write summary.json to logging.out_dir: %s", err)
    return RunResult(State.STOPPED, summary, error=error)
