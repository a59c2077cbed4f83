"""One arm of scripts/bench/bench_multinode.py, run as the driver inside a netcluster node's namespace.

    python -m scripts.bench.netbench.arm SPEC.json OUT.json

SPEC: ``config`` (a name or YAML path), ``overrides`` (``a.b=c`` strings), ``bridge_netns`` and
``links`` (node name -> bridge-side veth), ``timed_from`` (the first optimizer step of the timed
window is the one after it). The arm is one ``cluster.api.run``; at every step boundary the driver
reads the links' byte counters (``ip -n BRIDGE -s -j link``), so the bytes of the timed window are
exactly what the interfaces carried during those steps. The rank -> node map is read from the
actors themselves (each reports its Ray node's address). OUT: the window's wall time, steps and
per-link bytes, every step's metrics (without ``load_LE``), the rank addresses and the run state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time


def read_links(bridge_netns: str, links: dict[str, str]) -> dict[str, dict[str, int]]:
    """{node: {"sent", "received"}} from the bridge-side veth counters."""
    out = subprocess.run(["ip", "-n", bridge_netns, "-s", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    by_if = {d["ifname"]: d["stats64"] for d in json.loads(out) if "stats64" in d}
    return {node: {"sent": int(by_if[ifn]["rx"]["bytes"]), "received": int(by_if[ifn]["tx"]["bytes"])}
            for node, ifn in links.items()}


def _rank_addresses(cfg) -> list[str]:
    import ray

    from cluster.group import NAMESPACE, actor_name

    actors = [ray.get_actor(actor_name(cfg.cluster.run_name, r), namespace=NAMESPACE)
              for r in range(cfg.cluster.num_workers)]
    return [addr for addr, _port in ray.get([a.node_address.remote() for a in actors], timeout=60)]


def _metrics_row(m) -> dict:
    """The step's scalar metrics, and its counted traffic as ``{kind: [intra, inter]}`` bytes
    (plus ``checkpoint``) when the checkout counts it (``StepMetrics.traffic``)."""
    d = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in ("load_LE", "traffic")}
    row = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
           if isinstance(v, (int, float, str, bool, tuple, list, dict)) or v is None}
    traffic = getattr(m, "traffic", None)
    if traffic is not None:
        row["traffic"] = {k: list(v) for k, v in traffic.by_kind().items()}
        row["traffic"]["checkpoint"] = [0.0, float(traffic.checkpoint_bytes)]
    return row


def run_arm(spec: dict) -> dict:
    from cluster.api import RunFailed, load_config, run

    cfg = load_config(spec["config"], spec["overrides"])
    samples: list[dict] = []
    ranks: list[str] = []

    def on_step(m) -> None:
        if not ranks:
            ranks.extend(_rank_addresses(cfg))
        samples.append({"step": m.step, "t": time.monotonic(), "links": read_links(spec["bridge_netns"], spec["links"]),
                        "metrics": _metrics_row(m)})

    t0 = time.monotonic()
    try:
        result = run(cfg, on_step=on_step, raise_on_failure=False)
        state, error, restarts = result.state.value, result.error, result.restarts
    except RunFailed as exc:  # pragma: no cover - raise_on_failure=False
        state, error, restarts = "failed", str(exc), 0
    window = [s for s in samples if s["step"] >= spec["timed_from"]]
    out = {"state": state, "error": error, "restarts": restarts, "wall_s": time.monotonic() - t0,
           "rank_addresses": ranks, "steps": [{"step": s["step"], "t": s["t"], **s["metrics"]} for s in samples]}
    if len(window) >= 2:
        a, b = window[0], window[-1]
        out["window"] = {"from_step": a["step"], "to_step": b["step"], "steps": b["step"] - a["step"],
                         "seconds": b["t"] - a["t"],
                         "links": {n: {k: b["links"][n][k] - a["links"][n][k] for k in ("sent", "received")}
                                   for n in a["links"]}}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    spec = json.loads(open(argv[0]).read())
    out = run_arm(spec)
    with open(argv[1], "w") as f:
        json.dump(out, f)
    return 0 if out["state"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
