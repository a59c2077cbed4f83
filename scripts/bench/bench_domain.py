"""Domain-aware placement: do tokens stay local when ranks get few domains and hold their experts?

Trains the same MoE LM (global-batch LBL) twice on ``--workers`` Ray actors, changing only
``data.rank_assignment``:

- **shuffled**: every rank gets a random slice of each global batch. After ``--steps`` steps the
  off-rank sends of the contiguous placement are measured from the dispatcher (the last
  ``--measure-steps`` training steps), the domain-*agnostic* ILP placement (the statistics
  without home ranks: uniform origin) is solved from the trainer's statistics window and
  migrated to, and its sends are measured over ``--measure-steps`` more steps.
- **domain**: each rank's slice is as domain-homogeneous as the mixture allows (the same rows
  per micro-batch, so the same model up to float order). Contiguous sends are measured, then the
  *home-rank-aware* ILP (every sampled token scored from the rank that routed it) is solved and
  migrated to, and its sends are measured.

"Sends" are the dispatcher's off-rank unit sends (dedup) per token per MoE layer. Also reported:
rank load max/mean under the final placement (mean over measured steps and layers), validation
loss per domain of both arms, and the **best reduction the measured statistics allow**: the
least home-aware sends of *any* placement whose rank load stays within ``--balance-cap`` of the
mean, on the domain arm's statistics (exact: placement/exact.py's set-partition optimum when
there is one slot per expert; else the hypergraph ILP's proven, weaker, dual bound), against the
agnostic ILP's and the contiguous placement's modelled sends on the shuffled arm's statistics;
also with no load cap at all. Each sends target in the JSON carries that ``upper_bound`` and
``within_bound``: false means no placement of this trained model reaches the target.

Corpus (no downloads), four domains from files every CPython install has: ``code`` (stdlib
``*.py``), ``english`` (pydoc topics), ``build`` (the text files of CPython's ``config-*``
directory: Makefile, Setup*, makesetup, install-sh, ...) and ``capi`` (the C API headers,
``include/python3.X/**/*.h``); or ``--domain NAME=PATH`` (repeatable, >= 3 for the issue's
setting). ``--mixture`` (default: equal weights) sets ``data.mixture``: with four domains of equal
share on four ranks, the domain map gives each rank exactly one domain.

Prints a table and one JSON line (last line); writes ``results.json`` and ``bench_domain.png``
under ``--out``.

    .venv/bin/python scripts/bench/bench_domain.py                 # the documented run (~7 min on 2 quiet cores)
    .venv/bin/python scripts/bench/bench_domain.py --quick --out /tmp/bd   # CI smoke, ~1-2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moetrain.config import RunConfig, load_config, validate  # noqa: E402
from placement import Placement, Topology, evaluate, solve_placement  # noqa: E402
from placement.stats import RoutingStats, without_homes  # noqa: E402
from scripts.bench import results  # noqa: E402
from scripts.helpers import log  # noqa: E402

TARGETS = {  # the targets
    "sends_reduction_domain_vs_shuffled_ilp": (">=", 0.15),
    "sends_reduction_domain_vs_contiguous": (">=", 0.35),
    "rank_load_max_over_mean": ("<=", 1.10),
    "val_loss_delta_per_domain": ("<=", 0.02),  # max over domains of (domain - shuffled)
    "prepare_peak_rss_ratio_10x_over_1x": ("<=", 1.2),
}
_DESCRIPTIONS = {
    "sends_reduction_domain_vs_shuffled_ilp": "off-rank sends, domain assignment + home-aware ILP vs shuffled + ILP",
    "sends_reduction_domain_vs_contiguous": "off-rank sends, domain assignment + home-aware ILP vs contiguous",
    "rank_load_max_over_mean": "rank load max/mean per step",
    "val_loss_delta_per_domain": "validation loss, worst domain vs shuffled (nats)",
    "prepare_peak_rss_ratio_10x_over_1x": "prepare peak RSS, 10x corpus / 1x",
}
SCHEMA = results.Schema(
    "domain", "domain-aware ranks: home-aware placement vs shuffled data and contiguous placement (issue 16)",
    targets=tuple(results.Target(f"targets.{k}.value", op, thr, "%" if k.startswith("sends") else "",
                                 _DESCRIPTIONS[k], met_key=f"targets.{k}.met") for k, (op, thr) in TARGETS.items()),
    keys=("sends_reduction_domain_vs_shuffled_ilp", "sends_reduction_domain_vs_contiguous", "rank_load_max_over_mean",
          "val_loss_delta_per_domain", "prepare_rows_per_s", "prepare_peak_rss_mb_1x", "prepare_peak_rss_mb_10x",
          "sends_per_token_layer", "bound_home_sends_per_token_layer", "targets", "all_targets_met"))
DEFAULT = {"steps": 240, "measure_steps": 20, "workers": 4, "accum": 1, "global_batch": 64,
           "experts": 16, "expert_ffn": 64, "max_bytes": 600_000, "solve_time": 8.0, "precision": "bf16",
           # 4 MoE blocks (tiny has 2): the last block specialises most by domain (docs/domain_placement.md)
           "set": ["model.n_layers=4"]}
QUICK = {"steps": 12, "measure_steps": 3, "workers": 2, "accum": 1, "global_batch": 8,
         "experts": 4, "expert_ffn": 32, "max_bytes": 40_000, "solve_time": 1.0, "precision": "fp32",
         "set": ["model.dim=64", "model.ffn_dim=128", "model.max_seq_len=64", "data.seq_len=64",
                 "data.vocab_size=512"]}
EVEN_MIXTURE = "even"  # --mixture default: every domain the same share of each global batch
BUILD_FILES = ("Makefile", "Setup", "Setup.bootstrap", "Setup.local", "Setup.stdlib", "makesetup",
               "install-sh", "config.c", "config.c.in", "python-config.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="base config (default tiny)")
    p.add_argument("--steps", type=int, help="training steps before the re-placement (default 240)")
    p.add_argument("--measure-steps", type=int, help="steps measured per placement (default 20)")
    p.add_argument("--workers", type=int, help="Ray actors (default 4)")
    p.add_argument("--accum", type=int, help="micro-batches per step (default 1)")
    p.add_argument("--global-batch", type=int, help="sequences per step (default 64)")
    p.add_argument("--experts", type=int, help="routed experts per MoE layer (default 16, top-2)")
    p.add_argument("--expert-ffn", type=int, help="expert FFN width (default 64)")
    p.add_argument("--max-bytes", type=int, help="raw text per domain (default 600000)")
    p.add_argument("--lbl-coeff", type=float, default=0.01,
                   help="global LBL coefficient per MoE layer (default 0.01: 0.02 specialised less)")
    p.add_argument("--load-weight", type=float, default=4.0,
                   help="placement.load_weight of both ILPs (default 4: 2 left rank load at 1.14 x mean per step)")
    p.add_argument("--balance-cap", type=float, default=1.10, help="rank load cap of the bound (x mean)")
    p.add_argument("--solve-time", type=float, help="seconds per placement solve (default 8)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"),
                   help="train.precision (default bf16; --quick: fp32)")
    p.add_argument("--mixture", default=EVEN_MIXTURE,
                   help="data.mixture as 'a=1,b=2'; 'even' (default): equal weights; '' : rows per domain")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                   help="labelled text (file, directory, .jsonl, .parquet); default: code, english, build, capi")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--quick", action="store_true", help="CI smoke size (2 workers, a few steps)")
    p.add_argument("--out", default="runs/bench_domain")
    p.add_argument("--ray-temp-dir", default="")
    results.add_flag(p)
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    for key, value in base.items():
        if key != "set" and getattr(args, key) is None:
            setattr(args, key, value)
    args.set = base["set"] + args.set
    return args


# ---------------------------------------------------------------------------------------------
# Corpus and configuration
# ---------------------------------------------------------------------------------------------


def read_texts(paths) -> list[str]:
    """The UTF-8 text of each path, in order; unreadable or non-UTF-8 files are skipped."""
    docs = []
    for f in paths:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def build_domain_docs() -> list[str]:
    """The text files of CPython's build configuration directory (``LIBPL``: Makefile, Setup, ...)."""
    libpl = Path(sysconfig.get_config_var("LIBPL") or "")
    docs = read_texts(libpl / name for name in BUILD_FILES if (libpl / name).is_file())
    if not docs:
        raise SystemExit(f"bench_domain: no build files in {str(libpl)!r}; give three --domain NAME=PATH")
    return docs


def capi_domain_docs() -> list[str]:
    """CPython's C API headers (``sysconfig``'s ``include`` path, ``**/*.h`` in sorted order)."""
    inc = Path(sysconfig.get_paths().get("include") or "")
    docs = read_texts(sorted(inc.rglob("*.h")) if inc.is_dir() else [])
    if not docs:
        raise SystemExit(f"bench_domain: no C headers in {str(inc)!r}; give --domain NAME=PATH for each domain")
    return docs


def write_bundled_corpus(out: Path) -> list[str]:
    """The four default domains as JSONL files under ``out`` (one document per line)."""
    from moetrain.data.corpus import pydoc_topic_docs, stdlib_code_docs

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, docs in (("code", stdlib_code_docs()), ("english", pydoc_topic_docs()),
                       ("build", build_domain_docs()), ("capi", capi_domain_docs())):
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        entries.append(f"{name}={path}")
    return entries


def mixture_entries(mixture: str, domains: list[str]) -> list[str]:
    """``--mixture`` as ``data.mixture`` entries: 'even' -> every domain weight 1; '' -> []."""
    if mixture == EVEN_MIXTURE:
        return [f"{d.partition('=')[0]}=1" for d in domains]
    return [m for m in mixture.split(",") if m]


def build_config(args: argparse.Namespace, assignment: str, domains: list[str]) -> RunConfig:
    """One arm's config: only ``data.rank_assignment`` and the run name differ between arms."""
    steps = args.steps + args.measure_steps
    overrides = [
        f"train.steps={steps}", f"train.global_batch_size={args.global_batch}",
        f"train.grad_accum_steps={args.accum}", f"train.warmup_steps={max(1, steps // 10)}",
        "train.loss.lbl_scope=global", f"train.loss.lbl_coeff={args.lbl_coeff}", "train.eval_every=0",
        "train.eval_batches=1000", f"model.moe.num_experts={args.experts}", "model.moe.top_k=2",
        f"model.moe.expert_ffn_dim={args.expert_ffn}", f"cluster.num_workers={args.workers}",
        f"cluster.run_name=bench-domain-{assignment}", "logging.wandb=disabled", "logging.progress=false",
        "checkpoint.uri=", "placement.replan_every=0", f"placement.window={max(1, args.measure_steps)}",
        "placement.sample_tokens=16384", f"data.rank_assignment={assignment}",
        f"data.max_bytes_per_domain={args.max_bytes}", f"train.precision={args.precision}", *args.set,
    ]
    cfg = load_config(args.config, overrides)
    data = dataclasses.replace(cfg.data, source="paths", paths=list(domains),
                               mixture=mixture_entries(args.mixture, domains))
    return validate(dataclasses.replace(cfg, data=data))


# ---------------------------------------------------------------------------------------------
# One arm: train, measure contiguous, solve, migrate, measure the solved placement
# ---------------------------------------------------------------------------------------------


def rank_load_ratio(load_LE: np.ndarray, placement: Placement) -> np.ndarray:
    """Rank load max/mean per layer [L] of one step's global expert counts under ``placement``."""
    out = []
    for l in range(load_LE.shape[0]):
        row = placement.phy2log_LS[l]
        cnt = np.bincount(row, minlength=load_LE.shape[1])
        load_R = np.bincount(placement.slot_rank_S, weights=load_LE[l][row] / cnt[row], minlength=placement.num_ranks)
        out.append(load_R.max() / max(load_R.mean(), 1e-12))
    return np.array(out)


def _measure(group, steps: int, placement: Placement, tokens_layers: int) -> dict:
    """Sends per token-layer and rank load max/mean per step (mean over steps and layers; and over
    the ``steps`` steps' summed loads, ``_window``: the placement's balance without per-step noise)."""
    sends, ratio, hist, load_sum = [], [], [], 0.0
    for _ in range(steps):
        m = group.call("train_step")[0]
        sends.append(m.offrank_sends / tokens_layers)
        ratio.append(rank_load_ratio(m.load_LE, placement))
        load_sum = load_sum + np.asarray(m.load_LE, dtype=np.float64)
        hist.append(m.lm_loss)
    return {"sends_per_token": float(np.mean(sends)), "sends_per_token_steps": sends,
            "rank_load_max_over_mean": float(np.mean(ratio)), "rank_load_max_over_mean_worst": float(np.max(ratio)),
            "rank_load_max_over_mean_window": float(np.mean(rank_load_ratio(load_sum, placement))),
            "lm_loss": hist}


def specialisation(stats: RoutingStats, slots_per_rank: int) -> dict:
    """How strongly each home rank's tokens prefer few experts: the share of its expert selections
    that go to its ``slots_per_rank`` favourite experts (mean over layers), against
    ``slots_per_rank / E`` for uniform routing. Holding its favourites, a rank keeps this share of
    its selections local (if no other rank wants the same experts)."""
    E, R = stats.num_experts, stats.num_home_ranks
    top = np.zeros(R)
    for l in range(stats.num_layers):
        for r in range(R):
            ids = stats.topk_ids_TLK[stats.home_T == r, l]
            cnt = np.sort(np.bincount(ids[ids >= 0], minlength=E))[::-1]
            top[r] += cnt[:slots_per_rank].sum() / max(cnt.sum(), 1) / stats.num_layers
    return {"top_slots_share_per_home_rank": top.round(4).tolist(), "uniform": slots_per_rank / E}


def train_arm(cfg: RunConfig, args: argparse.Namespace, home_aware: bool, log) -> dict:
    from cluster.group import WorkerGroup
    from moetrain.model import count_moe_blocks
    from moetrain.train.stats import merge_rank_samples
    from moetrain.train.trainer import initial_placement

    name = cfg.data.rank_assignment
    L = count_moe_blocks(cfg.model)
    tokens_layers = cfg.train.global_batch_size * cfg.data.seq_len * L
    start = initial_placement(cfg)
    t0 = time.perf_counter()
    group = WorkerGroup.create(cfg, start)
    try:
        history = []
        for i in range(args.steps - args.measure_steps):
            m = group.call("train_step")[0]
            history.append(m.lm_loss)
            if m.step % max(1, args.steps // 8) == 0:
                log(f"[{name}] step {m.step} lm {m.lm_loss:.3f} sends/token-layer "
                    f"{m.offrank_sends / tokens_layers:.3f} {m.step_time_s * 1e3:.0f} ms")
        contiguous = _measure(group, args.measure_steps, start, tokens_layers)
        stats = merge_rank_samples(group.call("routing_stats"))  # with each token's home rank
        topo = Topology(num_ranks=start.num_ranks, slots_per_rank=start.slots_per_rank)
        solve_stats = stats if home_aware else without_homes(stats)
        res = solve_placement(solve_stats, topo, "ilp", current=start, time_limit_s=args.solve_time,
                              load_weight=args.load_weight, seed=cfg.train.seed)
        group.call("migrate", res.placement)
        solved = _measure(group, args.measure_steps, res.placement, tokens_layers)
        val = group.call("evaluate")[0]
    finally:
        group.shutdown()
    log(f"[{name}] trained + measured in {time.perf_counter() - t0:.0f} s")
    model = {k: evaluate(stats, p, topo, load_weight=args.load_weight).sends
             for k, p in (("contiguous", start), ("solved", res.placement))}
    return {"assignment": name, "home_aware": home_aware, "contiguous": contiguous, "solved": solved,
            "val_loss": val, "train_lm_loss": history + contiguous["lm_loss"] + solved["lm_loss"],
            "placement": res.placement.to_json(), "solve": res.summary(), "model_sends": model,
            "stats": stats, "topology": topo}


# ---------------------------------------------------------------------------------------------
# The bound: the best home-aware sends the statistics allow under a balance cap
# ---------------------------------------------------------------------------------------------


def sends_lower_bound(stats: RoutingStats, topo: Topology, balance_cap: float, time_s: float) -> dict:
    """Per layer, the least home-aware sends per token of any single-replica placement whose
    busiest rank carries at most ``balance_cap`` x the mean load, and with no cap (``uncapped``).

    Exact where placement/exact.py applies (one slot per expert, e.g. 16 experts on 4 ranks):
    the set-partition optimum, so the bound is also a placement (``kind`` "exact"). Otherwise
    the exact hypergraph ILP's proven dual bound (``kind`` "ilp_dual", weak: its LP relaxation)
    and the best placement that MIP found, no uncapped figure. Where no placement meets the cap,
    the cap is raised to what LPT packing achieves (``cap_L`` says which). Mean over layers."""
    from placement.baselines import pack_lpt
    from placement.cost import origin_classes
    from placement.exact import LayerTables, check_exact
    from placement.hyper_ilp import solve_exact
    from placement.hypergraph import build_hypergraph, rank_of_vertices
    from placement.placement import PlacementError

    origin_T, _, off_OR = origin_classes(stats, topo)
    srank = np.repeat(np.arange(topo.num_ranks), topo.slots_per_rank)
    E, R = stats.num_experts, topo.num_ranks
    try:
        check_exact(E, topo)
        kind = "exact"
    except PlacementError:
        kind = "ilp_dual"
    bounds, status, caps, found, uncapped = [], [], [], [], []
    one = np.ones(E, dtype=np.int64)
    for l in range(stats.num_layers):
        ids = stats.topk_ids_TLK[:, l]
        hg = build_hypergraph(ids, one, origin_T, off_OR.shape[0])
        T = max(hg.num_tokens, 1)
        mean = float(hg.load_V.sum()) / T / R
        lpt = pack_lpt(hg.load_V, one, topo)
        lpt_max = float(np.bincount(np.repeat(np.arange(R), topo.slots_per_rank), weights=hg.load_V[lpt]).max()) / T
        cap = balance_cap * mean
        if kind == "exact":
            tables = LayerTables(ids, E, topo, off_OR, origin_T)
            x = tables.solve(cap)
            if x.rank_E is None:
                cap = lpt_max * (1 + 1e-9)
                x = tables.solve(cap)
            bounds.append(x.cost)
            found.append(x.cost)
            status.append("optimal")
            uncapped.append(tables.solve(None).cost)
        else:
            cap = max(cap, lpt_max * (1 + 1e-9))
            res = solve_exact(hg, off_OR, np.array(topo.slots_per_rank), 0.0, np.zeros((E, R)),
                              warm_V=rank_of_vertices(lpt, srank), time_limit_s=time_s, max_edges=hg.num_edges,
                              cap=cap)
            bounds.append(res.bound)
            found.append(hg.objective(res.rank_V, off_OR, 0.0) if res.rank_V is not None else math.nan)
            status.append(res.status)
        caps.append(cap / mean)
    return {"kind": kind, "bound_L": bounds, "bound": float(np.mean(bounds)), "best_found_L": found,
            "best_found": float(np.mean(found)), "status": status, "cap_L": caps, "uncapped_L": uncapped,
            "uncapped": float(np.mean(uncapped)) if uncapped else math.nan}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def prepare_metrics(quick: bool) -> dict:
    """``prepare_*`` keys: ``moetrain prepare`` at 1x and 10x the corpus (scripts/bench/bench_prepare.py,
    rows/s and the process tree's peak RSS); null under --quick (the smoke test skips it)."""
    keys = ("prepare_rows_per_s", "prepare_peak_rss_mb_1x", "prepare_peak_rss_mb_10x")
    if quick:
        return {k: None for k in keys}
    from scripts.bench.bench_prepare import measure

    got = measure(copies=10)
    return {k: got[k] for k in keys}


def reduction(after: float, before: float) -> float:
    return 1.0 - after / before if before > 0 else math.nan


def check_targets(line: dict) -> dict:
    rss1, rss10 = line["prepare_peak_rss_mb_1x"], line["prepare_peak_rss_mb_10x"]
    values = {
        "sends_reduction_domain_vs_shuffled_ilp": line["sends_reduction_domain_vs_shuffled_ilp"],
        "sends_reduction_domain_vs_contiguous": line["sends_reduction_domain_vs_contiguous"],
        "rank_load_max_over_mean": line["rank_load_max_over_mean"],
        "val_loss_delta_per_domain": max(line["val_loss_delta_per_domain"].values()),
        "prepare_peak_rss_ratio_10x_over_1x": rss10 / rss1 if rss1 and rss10 else None,
    }
    out = {}
    for key, (op, target) in TARGETS.items():
        v = values[key]
        met = None if v is None else (v >= target if op == ">=" else v <= target)
        out[key] = {"value": v, "target": f"{op} {target}", "met": met}
    # the sends targets beside the best reduction the statistics allow (the bound): a target
    # above it cannot be met by any placement of this trained model within the balance cap
    for key, ub in (("sends_reduction_domain_vs_shuffled_ilp", "sends_reduction_upper_bound_vs_shuffled_ilp"),
                    ("sends_reduction_domain_vs_contiguous", "sends_reduction_upper_bound_vs_contiguous")):
        out[key]["upper_bound"] = line[ub]
        out[key]["within_bound"] = bool(line[ub] >= TARGETS[key][1])
    return out


def summarise(shuf: dict, dom: dict, bound: dict, args: argparse.Namespace) -> dict:
    s_contig, s_ilp = shuf["contiguous"]["sends_per_token"], shuf["solved"]["sends_per_token"]
    d_contig, d_ilp = dom["contiguous"]["sends_per_token"], dom["solved"]["sends_per_token"]
    agn_model = shuf["model_sends"]["solved"]  # modelled sends of the agnostic ILP, shuffled stats
    line = {
        "benchmark": "bench_domain", "steps": args.steps, "measure_steps": args.measure_steps,
        "workers": args.workers, "experts": args.experts, "global_batch": args.global_batch,
        "sends_per_token_layer": {"shuffled_contiguous": s_contig, "shuffled_agnostic_ilp": s_ilp,
                                  "domain_contiguous": d_contig, "domain_home_ilp": d_ilp},
        "model_sends_per_token_layer": {"shuffled": shuf["model_sends"], "domain": dom["model_sends"]},
        "sends_reduction_domain_vs_shuffled_ilp": reduction(d_ilp, s_ilp),
        "sends_reduction_domain_vs_contiguous": reduction(d_ilp, s_contig),
        "rank_load_max_over_mean": dom["solved"]["rank_load_max_over_mean"],
        "rank_load_max_over_mean_window": dom["solved"]["rank_load_max_over_mean_window"],
        "rank_load_max_over_mean_shuffled_ilp": shuf["solved"]["rank_load_max_over_mean"],
        "rank_load_max_over_mean_contiguous": {"shuffled": shuf["contiguous"]["rank_load_max_over_mean"],
                                               "domain": dom["contiguous"]["rank_load_max_over_mean"]},
        "specialisation_domain_arm": specialisation(dom["stats"], dom["topology"].slots_per_rank[0]),
        "val_loss_delta_per_domain": {d: dom["val_loss"][d] - shuf["val_loss"][d] for d in dom["val_loss"]},
        "val_loss": {"shuffled": shuf["val_loss"], "domain": dom["val_loss"]},
        "bound_kind": bound["kind"],
        "bound_home_sends_per_token_layer": bound["bound"], "bound_status": bound["status"],
        "best_found_home_sends_per_token_layer": bound["best_found"],
        "bound_uncapped_home_sends_per_token_layer": bound["uncapped"],
        "sends_reduction_upper_bound_uncapped_vs_contiguous": reduction(bound["uncapped"],
                                                                        shuf["model_sends"]["contiguous"]),
        "sends_reduction_best_found_vs_shuffled_ilp": reduction(bound["best_found"], agn_model),
        "bound_balance_cap": args.balance_cap,
        "sends_reduction_upper_bound_vs_shuffled_ilp": reduction(bound["bound"], agn_model),
        "sends_reduction_upper_bound_vs_contiguous": reduction(bound["bound"], shuf["model_sends"]["contiguous"]),
        **prepare_metrics(args.quick),
    }
    line["targets"] = check_targets(line)
    line["all_targets_met"] = all(t["met"] is True for t in line["targets"].values())
    return line


def plot(shuf: dict, dom: dict, line: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    labels = ["shuffled\ncontiguous", "shuffled\nagnostic ILP", "domain\ncontiguous", "domain\nhome-aware ILP"]
    vals = list(line["sends_per_token_layer"].values())
    bars = ax.bar(labels, vals, color=["#999", "#6a8", "#bbb", "#37a"])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    what = "optimum (exact)" if line["bound_kind"] == "exact" else "lower bound"
    ax.axhline(line["bound_home_sends_per_token_layer"], color="r", ls="--", lw=1,
               label=f"{what}, home-aware, load <= {line['bound_balance_cap']:.2f}x mean")
    ax.set_ylabel("off-rank sends per token per MoE layer\n(dispatcher, dedup)", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    ax.tick_params(labelsize=7)
    stats, p = dom["stats"], Placement.from_json(dom["placement"])
    l = stats.num_layers - 1
    R, E = p.num_ranks, stats.num_experts
    P_RE = np.zeros((R, E))
    for r in range(R):
        ids = stats.topk_ids_TLK[stats.home_T == r, l]
        P_RE[r] = np.bincount(ids[ids >= 0], minlength=E) / max(ids.size, 1)
    order = p.phy2log_LS[l]
    ax2.imshow(100 * P_RE[:, order], cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(P_RE[:, order]):
        ax2.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="w")
    spr = p.slots_per_rank[0]
    for r in range(1, R):
        ax2.axvline(r * spr - 0.5, color="w", lw=2)
    ax2.set_xticks(range(E), [str(e) for e in order], fontsize=7)
    ax2.set_yticks(range(R), [f"home rank {r}" for r in range(R)], fontsize=7)
    ax2.set_xlabel("expert, grouped by the rank the home-aware ILP put it on", fontsize=8)
    ax2.set_title(f"domain arm, MoE layer {l}: % of each home rank's selections", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(line: dict) -> str:
    rows = [(k, v) for k, v in line["sends_per_token_layer"].items()]
    out = [f"{'configuration':<28}{'sends/token/layer':>20}"] + [f"{k:<28}{v:>20.4f}" for k, v in rows]
    what = "optimum" if line["bound_kind"] == "exact" else "lower bound"
    out.append(f"{what + ' (home-aware, capped)':<28}{line['bound_home_sends_per_token_layer']:>20.4f}")
    out.append(f"{'optimum (no load cap)':<28}{line['bound_uncapped_home_sends_per_token_layer']:>20.4f}")
    for key, t in line["targets"].items():
        v = t["value"]
        ub = f"  bound {t['upper_bound']:.4f}" if "upper_bound" in t else ""
        out.append(f"{key:<40} {'null' if v is None else f'{v:.4f}':>10}  target {t['target']:<8} met {t['met']}{ub}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    domains = args.domain or write_bundled_corpus(out / "corpus")
    cfgs = {a: build_config(args, a, domains) for a in ("shuffled", "domain")}
    from moetrain.data import build_dataset

    ds = build_dataset(cfgs["shuffled"].data)  # on the driver first: bad data fails before any actor
    log(ds.summary())
    import ray

    started = False
    if not ray.is_initialized():
        started = True
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], namespace="moetrain", log_to_driver=False)
        else:
            ray.init(num_cpus=max(args.workers + 1, os.cpu_count() or 1), include_dashboard=False,
                     namespace="moetrain", log_to_driver=False, configure_logging=False,
                     _temp_dir=args.ray_temp_dir or None)
    try:
        shuf = train_arm(cfgs["shuffled"], args, home_aware=False, log=log)
        dom = train_arm(cfgs["domain"], args, home_aware=True, log=log)
    finally:
        if started:
            ray.shutdown()
    bound = sends_lower_bound(dom["stats"], dom["topology"], args.balance_cap, args.solve_time)
    log(f"bound: {bound}")
    line = summarise(shuf, dom, bound, args)
    for arm in (shuf, dom):  # the statistics windows, with home ranks (placement.load_routing reads them)
        arm["stats"].save(out / f"stats_{arm['assignment']}.npz")
    plot(shuf, dom, line, out / "bench_domain.png")
    keep = ("assignment", "home_aware", "contiguous", "solved", "val_loss", "train_lm_loss", "placement",
            "solve", "model_sends")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "line": line, "bound": bound,
         "arms": {a["assignment"]: {k: a[k] for k in keep} for a in (shuf, dom)}}, indent=1, default=str))
    print(format_table(line))
    line["figure"] = str(out / "bench_domain.png")
    print(json.dumps(line), flush=True)
    results.record(SCHEMA, line, args)
    return line


if __name__ == "__main__":
    main()
