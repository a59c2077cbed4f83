"""The Python API for driver scripts: build a config, run it on Ray, read the results.

    from cluster.api import load_config, run
    cfg = load_config("tiny", ["train.steps=50", "cluster.num_workers=2"])
    result = run(cfg)                  # starts an embedded local Ray, or joins RAY_ADDRESS
    print(result.summary["val_loss"], result.history[-1].loss)
"""

from __future__ import annotations

import logging
import os

from cluster.checkpointing import check_store_writable
from cluster.controller import Controller, RunFailed, RunResult, State
from moetrain.config import RunConfig, load_config

__all__ = ["load_config", "run", "ensure_ray", "RunResult", "RunFailed", "State"]


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when a ``HOST:PORT`` Ray address accepts no connection (ray.init
    itself would retry for minutes). ``ray://`` and ``auto`` addresses are left to Ray."""
    import socket

    from moetrain.config import ConfigError, _host_port

    if address.startswith(("ray://", "auto")):
        return
    hp = _host_port(address)
    if hp is None:
        raise ConfigError(f"Ray address {address!r} must be HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s "
                          f"(cluster.connect_timeout_s): {exc}") from None


def ensure_ray(cfg: RunConfig) -> None:
    """Join ``cluster.address`` / ``RAY_ADDRESS``, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address, cfg.cluster.connect_timeout_s)
        ray.init(address=address, namespace="moetrain", log_to_driver=True)
        return
    need = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1
    ray.init(num_cpus=max(int(need + 0.999), os.cpu_count() or 1), namespace="moetrain",
             include_dashboard=False, log_to_driver=True, configure_logging=False)


def run(cfg: RunConfig, *, on_step=None, raise_on_failure: bool = True) -> RunResult:
    """Run training to the end (or to FAILED). ``on_step(metrics)`` is called on the driver."""
    from moetrain.data import build_dataset

    logging.getLogger("moetrain").setLevel(logging.INFO)
    # Build (or load from cache) the dataset on the driver first: bad data fails fast with a clear
    # error before any actor starts, and the workers then read the finished cache.
    build_dataset(cfg.data)
    check_store_writable(cfg)  # seconds, before any actor: a read-only store is a user error
    ensure_ray(cfg)
    result = Controller(cfg, on_step=on_step).run()
    if result.state == State.FAILED and raise_on_failure:
        raise RunFailed(f"run {cfg.cluster.run_name} failed:\n{result.error}")
    return result
