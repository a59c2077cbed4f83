"""What a run shows people: Ray dashboard metrics, wandb, and files next to the run's outputs.

Owns: custom metrics through ``ray.util.metrics`` (tokens/s, loss, expert-load max/mean per
layer, off-rank sends, bytes sent per step by kind and link class (inside a node / between
nodes; per MoE layer for the expert all-to-all), re-placement decisions and solve time,
checkpoint MB/s and stall, run state), the run's traffic totals in ``summary.json``, the wandb run (offline
unless ``WANDB_API_KEY`` is set and ``logging.wandb=online``),
and the run's output folder: ``summary.json``, ``routing.npz`` (the trace format the placement
library reads), ``placement.json`` and ``expert_load.png`` (a layers x experts heatmap). Also
what the driver prints about where to watch the run (:func:`dashboard_text`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moetrain.config import RunConfig
from moetrain.parallel.traffic import LINKS, StepTraffic
from moetrain.train.metrics import StepMetrics
from moetrain.train.summary import load_imbalance
from placement.placement import Placement
from placement.stats import RoutingStats, save_routing

if TYPE_CHECKING:
    from cluster.replacement import Decision

log = logging.getLogger("moetrain")

STATES = [
    "starting",
    "running",
    "replacing",
    "checkpointing",
    "resizing",
    "restarting",
    "finished",
    "stopped",
    "failed",
]

# The metrics a person watches first (Prometheus names, as Ray exports them); every one is set
# by _RayMetrics below. The full list is in docs/operations.md.
KEY_METRICS = (
    "ray_moetrain_tokens_per_s",
    "ray_moetrain_loss",
    "ray_moetrain_expert_load_max_over_mean",
    "ray_moetrain_offrank_sends",
    "ray_moetrain_bytes_per_step",
    "ray_moetrain_state",
)


@dataclass(frozen=True)
class RayInfo:
    """Where the driver's Ray can be watched: dashboard, metrics, and whether sign-in is needed."""

    dashboard_url: str  # "http://127.0.0.1:8265"; "" when this Ray runs no dashboard
    metrics_url: str  # this node's Prometheus export ("http://127.0.0.1:PORT/metrics"); "" if unknown
    token_auth: bool  # Ray token auth is on: the dashboard asks for the token
    embedded: bool  # this driver started the Ray instance (it, and its dashboard, end with the run)


class _RayMetrics:
    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("run",)
        self.tags = {"run": run}
        g = lambda name, desc, keys=tags: Gauge(f"moetrain_{name}", description=desc, tag_keys=keys)  # noqa: E731
        self.tokens_per_s = g("tokens_per_s", "training throughput (tokens/s)")
        self.loss = g("loss", "training loss (LM + aux)")
        self.lm_loss = g("lm_loss", "language-model loss")
        self.load_imbalance = g("expert_load_max_over_mean", "expert load max/mean per MoE layer", ("run", "layer"))
        self.offrank = g("offrank_sends", "token rows sent to other ranks per step")
        self.step = g("step", "optimizer step")
        self.state = g("state", "1 for the run's current controller state", ("run", "state"))
        self.solve_s = g("placement_solve_s", "re-placement solve time (s)")
        self.gain = g("placement_predicted_gain", "predicted relative cost reduction of the last re-placement")
        self.ckpt_mbps = g("checkpoint_mb_per_s", "checkpoint upload MB/s")
        self.ckpt_stall = g("checkpoint_stall_s", "training stall of the last checkpoint (s)")
        self.ckpt_failures = Counter(
            "moetrain_checkpoint_failures", description="checkpoints that failed", tag_keys=tags
        )
        self.skipped = Counter(
            "moetrain_skipped_steps", description="steps skipped: non-finite loss or grad norm", tag_keys=tags
        )
        self.replacements = Counter("moetrain_replacements", description="migrations performed", tag_keys=tags)
        self.resizes = Counter("moetrain_resizes", description="group size changes (elastic runs)", tag_keys=tags)
        self.world_size = g("world_size", "ranks in the worker group now")
        self.steps = Counter("moetrain_steps", description="optimizer steps", tag_keys=tags)
        self.step_bytes = g(
            "bytes_per_step",
            "bytes sent in the last step (all ranks) by kind and link (intra / inter node; checkpoint: store)",
            ("run", "kind", "link"),
        )
        self.a2a_layer_bytes = g(
            "a2a_bytes_per_step",
            "expert all-to-all bytes of the last step (all ranks, forward + backward) per MoE layer and link",
            ("run", "layer", "link"),
        )
        self.bytes_sent = Counter(
            "moetrain_bytes_sent",
            description="bytes sent since the run started, by kind and link",
            tag_keys=("run", "kind", "link"),
        )


class Telemetry:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_name = cfg.cluster.run_name
        self.out_dir = Path(cfg.logging.out_dir).expanduser().resolve() / self.run_name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics: _RayMetrics | None = None
        try:
            import ray

            if ray.is_initialized():
                self.metrics = _RayMetrics(self.run_name)
        except Exception as exc:  # metrics are best effort, never fatal
            log.warning("Ray metrics unavailable: %s", exc)
        self.wandb = self._init_wandb()
        self.traffic = TrafficTotals()

    def _init_wandb(self):
        mode = self.cfg.logging.wandb
        if mode == "disabled":
            return None
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            log.warning("logging.wandb=online but WANDB_API_KEY is not set: logging offline")
            mode = "offline"
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run = wandb.init(
                project=self.cfg.logging.wandb_project,
                name=self.run_name,
                mode=mode,
                dir=str(self.out_dir),
                config=self.cfg.to_dict(),
                reinit="finish_previous",
            )
            # Every row carries the optimizer step as its x-axis: validation, checkpoint and
            # re-placement rows can share a step with the training row.
            run.define_metric("train_step")
            run.define_metric("*", step_metric="train_step")
            return run
        except Exception as exc:
            log.warning("wandb unavailable (%s): continuing without it", exc)
            return None

    # ---- events --------------------------------------------------------------------------------
    def state(self, state: str) -> None:
        if self.metrics:
            for s in STATES:
                self.metrics.state.set(1.0 if s == state else 0.0, {**self.metrics.tags, "state": s})

    def step(self, m: StepMetrics) -> None:
        imb = load_imbalance(m.load_LE)
        tps = m.tokens_per_s
        if self.metrics:
            t = self.metrics.tags
            self.metrics.tokens_per_s.set(tps, t)
            self.metrics.loss.set(m.loss, t)
            self.metrics.lm_loss.set(m.lm_loss, t)
            self.metrics.offrank.set(m.offrank_sends, t)
            self.metrics.step.set(m.step, t)
            self.metrics.steps.inc(1, t)
            if m.skipped:
                self.metrics.skipped.inc(1, t)
            for layer, v in enumerate(imb):
                self.metrics.load_imbalance.set(float(v), {**t, "layer": str(layer)})
            self._traffic_metrics(m)
        self.traffic.add(m.traffic)
        if self.wandb:
            row = {k: getattr(m, k) for k in ("loss", "lm_loss", "lbl", "z_loss", "grad_norm", "lr", "offrank_sends")}
            row["tokens_per_s"] = tps
            row.update({f"traffic/{kind}/{link}": v for kind, link, v in traffic_rows(m.traffic)})
            row.update({f"expert_load_max_over_mean/layer{i}": float(v) for i, v in enumerate(imb)})
            self.wandb.log({**row, "train_step": m.step})

    def _traffic_metrics(self, m: StepMetrics) -> None:
        assert self.metrics is not None  # called only with Ray metrics on
        t = self.metrics.tags
        for kind, link, v in traffic_rows(m.traffic):
            self.metrics.step_bytes.set(v, {**t, "kind": kind, "link": link})
            if v:
                self.metrics.bytes_sent.inc(v, {**t, "kind": kind, "link": link})
        for layer, row in enumerate(m.traffic.a2a_LPC.sum(axis=1)):
            for link, v in zip(LINKS, row):
                self.metrics.a2a_layer_bytes.set(float(v), {**t, "layer": str(layer), "link": link})

    def checkpoint_failed(self, step: int) -> None:
        if self.metrics:
            self.metrics.ckpt_failures.inc(1, self.metrics.tags)
        if self.wandb:
            self.wandb.log({"checkpoint/failed": 1, "train_step": step})

    def validation(self, step: int, val: dict) -> None:
        if self.wandb:
            self.wandb.log({**{f"val_loss/{d}": v for d, v in val.items()}, "train_step": step})

    def resize(self, e) -> None:
        """An elastic resize (a :class:`cluster.elastic.ResizeEvent`)."""
        if self.metrics:
            self.metrics.resizes.inc(1, self.metrics.tags)
            self.metrics.world_size.set(e.to_ranks, self.metrics.tags)
        if self.wandb:
            row = {f"resize/{k}": v for k, v in e.to_dict().items() if isinstance(v, (int, float))}
            self.wandb.log({**row, "train_step": e.step})

    def replacement(self, d: Decision) -> None:
        if self.metrics:
            t = self.metrics.tags
            self.metrics.solve_s.set(d.proposal.solve_time_s, t)
            self.metrics.gain.set(d.predicted_gain, t)
            if d.migrated:
                self.metrics.replacements.inc(1, t)
        if self.wandb:
            self.wandb.log(
                {
                    "placement/predicted_gain": d.predicted_gain,
                    "placement/fit_gain": d.proposal.fit_gain,
                    "placement/val_score": d.proposal.val_after,
                    "placement/val_score_current": d.proposal.val_before,
                    **{f"placement/layer{layer}/val_score": v for layer, v in enumerate(d.proposal.val_after_L)},
                    **{f"placement/layer{layer}/fit_score": v for layer, v in enumerate(d.proposal.fit_after_L)},
                    "placement/solve_s": d.proposal.solve_time_s,
                    "placement/migrated": int(d.migrated),
                    "placement/bytes_moved": d.bytes_moved,
                    "train_step": d.step,
                }
            )

    def checkpoint(self, step: int, mb_per_s: float, stall_s: float) -> None:
        if self.metrics:
            self.metrics.ckpt_mbps.set(mb_per_s, self.metrics.tags)
            self.metrics.ckpt_stall.set(stall_s, self.metrics.tags)
        if self.wandb:
            self.wandb.log({"checkpoint/mb_per_s": mb_per_s, "checkpoint/stall_s": stall_s, "train_step": step})

    # ---- end of run -----------------------------------------------------------------------------
    def write_outputs(self, stats: RoutingStats, placement: Placement, cfg: RunConfig) -> str:
        load = stats.load_LE
        save_routing(self.out_dir / "routing.npz", stats, {"model": "moetrain"})
        (self.out_dir / "placement.json").write_text(placement.to_json())
        png = self.out_dir / "expert_load.png"
        save_heatmap(load, png, title=f"{self.run_name}: expert load (share of tokens)")
        if self.wandb:
            import wandb

            self.wandb.log(
                {
                    "expert_load_heatmap": wandb.Image(str(png)),
                    "placement": wandb.Table(
                        columns=["layer", "phy2log"],
                        data=[[i, json.dumps(r.tolist())] for i, r in enumerate(placement.phy2log_LS)],
                    ),
                }
            )
        return str(self.out_dir)

    def close(self, summary: dict) -> None:
        if summary:
            summary.setdefault("traffic", self.traffic.to_dict())
            write_summary(self.out_dir, summary)
        if self.wandb:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
            self.wandb = None


# ---- traffic ----------------------------------------------------------------------------------
def traffic_rows(t: StepTraffic) -> list[tuple[str, str, float]]:
    """``(kind, link, bytes)`` of one step: every kind x (intra, inter), and checkpoint / store."""
    rows = [(kind, link, v) for kind, pair in t.by_kind().items() for link, v in zip(LINKS, pair)]
    return rows + [("checkpoint", "store", float(t.checkpoint_bytes))]


class TrafficTotals:
    """The run's bytes sent, summed over the steps the driver saw (restarted steps count again:
    they were sent again)."""

    def __init__(self) -> None:
        self.steps = 0
        self.kinds: dict[str, np.ndarray] = {}
        self.a2a_LC: np.ndarray | None = None
        self.checkpoint_bytes = 0.0

    def add(self, t: StepTraffic) -> None:
        self.steps += 1
        for kind, pair in t.by_kind().items():
            self.kinds[kind] = self.kinds.get(kind, np.zeros(2)) + np.asarray(pair)
        a2a = t.a2a_LPC.sum(axis=1)
        self.a2a_LC = a2a if self.a2a_LC is None or self.a2a_LC.shape != a2a.shape else self.a2a_LC + a2a
        self.checkpoint_bytes += float(t.checkpoint_bytes)

    def to_dict(self) -> dict:
        """``summary.json``'s ``traffic``: totals by kind and link, per step, per MoE layer."""
        kinds = {k: dict(zip(LINKS, map(float, v))) for k, v in self.kinds.items()}
        inter = sum(v["inter"] for v in kinds.values())
        intra = sum(v["intra"] for v in kinds.values())
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "bytes_by_kind": kinds,
            "intra_node_bytes": intra,
            "inter_node_bytes": inter,
            "inter_node_bytes_per_step": inter / n,
            "intra_node_bytes_per_step": intra / n,
            "a2a_bytes_by_layer": [] if self.a2a_LC is None else self.a2a_LC.tolist(),
            "checkpoint_upload_bytes": self.checkpoint_bytes,
        }


def write_summary(out_dir: Path, summary: dict) -> Path:
    """``<out_dir>/summary.json``: how the run ended (every terminal state) and its results if any."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=float))
    return path


# ---- what the driver prints about watching the run ---------------------------------------------
def dashboard_text(info: RayInfo, cfg: RunConfig) -> str:
    """Lines printed before training: the dashboard URL, how to sign in, where the actors and the
    metrics are."""
    c = cfg.cluster
    last = f" .. rank-{c.num_workers - 1}" if c.num_workers > 1 else ""
    if info.dashboard_url:
        lines = [
            f"Ray dashboard: {info.dashboard_url}"
            + ("  (served by this run's Ray: open it while the run lasts)" if info.embedded else "")
        ]
        if info.token_auth:
            lines.append(
                f"  sign-in token: run `{_ray_cli()} get-auth-token` on this machine and paste what it "
                "prints (Ray token auth is on; RAY_AUTH_MODE=disabled turns it off)"
            )
        else:
            lines.append(
                "  no sign-in token: Ray token auth is disabled (RAY_AUTH_MODE=disabled); whoever can "
                "reach this address can use the dashboard"
            )
        lines.append(f"  Actors tab: moetrain/{c.run_name}/rank-0{last} (one actor per expert-parallel rank)")
    else:
        why = "cluster.dashboard=false" if info.embedded and not c.dashboard else "this Ray instance runs none"
        lines = [f"Ray dashboard: off ({why})"]
    where = info.metrics_url or "each node's metrics export port, /metrics"
    lines.append(
        f"  metrics (tag run={c.run_name}; Prometheus text at {where}; the dashboard's Metrics tab "
        "needs Prometheus + Grafana; full list in docs/operations.md):"
    )
    lines.append("    " + ", ".join(KEY_METRICS))
    return "\n".join(lines)


def _ray_cli() -> str:
    """``ray``, or the full path of the ``ray`` next to this interpreter when it is not on PATH."""
    if shutil.which("ray"):
        return "ray"
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


# ---- the expert-load heatmap ------------------------------------------------------------------
MAX_TICK_LABELS = 32  # at most this many index labels per heatmap axis (every n-th beyond that)


def _index_ticks(n: int) -> np.ndarray:
    """Integer tick positions 0, s, 2s, ... < n with at most MAX_TICK_LABELS of them."""
    step = -(-n // MAX_TICK_LABELS)
    return np.arange(0, n, max(step, 1))


def save_heatmap(load_LE: np.ndarray, path: Path, title: str = "expert load") -> None:
    """Write :func:`heatmap_figure` of ``load_LE`` [L, E] to a PNG at ``path``."""
    fig = heatmap_figure(load_LE, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)


def heatmap_figure(load_LE: np.ndarray, title: str = "expert load"):
    """Layers x experts heatmap of each expert's share of its layer's tokens, [L, E] -> Figure.

    Rows are labelled with the integer MoE-layer index (as in the summary's ``L0``, ``L1`` and the
    ``layer`` metric tag), columns with the integer expert index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = np.asarray(load_LE, dtype=np.float64)
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * share.shape[1] + 2), max(2, 0.5 * share.shape[0] + 1.2)))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    for axis, n in ((ax.xaxis, share.shape[1]), (ax.yaxis, share.shape[0])):
        ticks = _index_ticks(n)
        axis.set_ticks(ticks, labels=[str(i) for i in ticks])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of tokens")
    fig.tight_layout()
    return fig
