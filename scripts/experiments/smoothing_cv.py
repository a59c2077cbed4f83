"""Does smoothing the fitted hyperedges generalise better? Pairwise shrinkage chosen by internal CV.

A study for issue #15 item 5 (the ILP pipeline vs Mt-KaHyPar on held-out sends). Not used by
the solver: on the bench's six cases it did not generalise better (README, placement section).

Idea: routing statistics are a finite window. With top-4 of 60 experts most distinct top-k sets
occur once in a few thousand tokens (Qwen trace: 78-88% of a layer's hyperedges weigh 1), so the
fitted optimum partly places noise (the optimiser's curse). A pair of experts' co-activation
pools every top-k set that holds the pair: a far less noisy statistic. The smoothed objective

    traffic_alpha = (1 - alpha) traffic(top-k sets) + alpha traffic(pairs)

gives every token of m >= 2 pins its C(m, 2) pairs as 2-pin hyperedges of weight 2/m (a token
spread over m ranks then costs (m - 1) pair cuts, as its km1; one on a single rank, none); the
load and migration terms are unchanged. alpha = 0 is the fitted objective.

**Choosing alpha on the fitted tokens only** (held-out tokens are scored, never used to
choose): the fitted tokens are split into ``folds`` seeded folds; for each alpha in the grid and
each fold, iterated FM (placement/refine.py) from a balanced LPT packing of the training folds'
loads (a start that has not seen the scored fold) runs on the other folds' smoothed hypergraph,
and the *unsmoothed* objective of the fold left out scores it; the lowest total wins (ties: the
smaller alpha). The refit: iterated FM on every fitted token's smoothed hypergraph from the ILP
pipeline's answer (alpha = 0: the pipeline's answer stands).

Weights stay integers (exact incremental FM gains): alpha is ``num / ALPHA_DEN`` and every weight
is scaled by ``ALPHA_DEN x lcm(2..K)``, the token count with it (the objective stays per token).

    .venv/bin/python scripts/experiments/smoothing_cv.py            # the six bench cases, ~5 min
    .venv/bin/python scripts/experiments/smoothing_cv.py --quick    # a synthetic case, seconds

Prints one line per case, then one JSON line (last line).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from placement import (Placement, Topology, evaluate, from_topk_ids, load_routing, solve_placement,  # noqa: E402
                       split_tokens)
from placement.baselines import pack_lpt  # noqa: E402
from placement.hypergraph import LayerHypergraph, build_hypergraph, rank_of_vertices, row_from_ranks  # noqa: E402
from placement.refine import iterated_fm  # noqa: E402
from scripts.helpers import TRACES  # noqa: E402

ALPHA_DEN = 8  # alpha is a multiple of 1/ALPHA_DEN
DEFAULT_ALPHAS = (0, 1, 2, 4)  # numerators: alpha in {0, 1/8, 1/4, 1/2}
DEFAULT_FOLDS = 4
CV_ROUNDS = 12  # iterated-FM perturbation rounds per cross-validation fit
CV_SWAPS = 8  # random exchanges per perturbation


def _pairs(hg: LayerHypergraph, scale_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every hyperedge's pin pairs, merged: ([P, 2] vertex pairs, [P] weights), each pair of a
    hyperedge of m pins weighing ``weight * scale_m[m]``."""
    a_list, b_list, w_list = [], [], []
    size_H = np.diff(hg.edge_ptr)
    for m in np.unique(size_H):
        rows = np.flatnonzero(size_H == m)
        pins = hg.edge_pins[hg.edge_ptr[rows][:, None] + np.arange(m)]  # [n, m] ascending
        i, j = np.triu_indices(int(m), 1)
        a_list.append(pins[:, i].ravel())
        b_list.append(pins[:, j].ravel())
        w_list.append(np.repeat(hg.weight_H[rows] * scale_m[m], len(i)))
    if not a_list:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    ab = np.stack([np.concatenate(a_list), np.concatenate(b_list)], axis=1)
    uniq, inv = np.unique(ab, axis=0, return_inverse=True)
    return uniq.astype(np.int64), np.bincount(inv.ravel(), weights=np.concatenate(w_list))


def smoothed_hypergraph(hg: LayerHypergraph, alpha_num: int, alpha_den: int = ALPHA_DEN) -> LayerHypergraph:
    """``hg`` with its traffic smoothed by alpha = ``alpha_num / alpha_den`` (module docstring):
    the top-k sets at weight (1 - alpha), their pin pairs at alpha x 2/m, integer weights scaled
    by ``alpha_den x lcm(2..K)`` (as is ``num_tokens``). Uniform origin only (no home ranks)."""
    if hg.origin_H is not None:
        raise ValueError("smoothed_hypergraph: hypergraphs with home ranks (origin classes) are not supported")
    if not 0 <= alpha_num <= alpha_den or alpha_den < 1:
        raise ValueError(f"alpha ({alpha_num}/{alpha_den}) must be in [0, 1]")
    size_H = np.diff(hg.edge_ptr)
    k = int(size_H.max()) if len(size_H) else 2
    base = math.lcm(*range(2, max(k, 2) + 1))
    scale = alpha_den * base
    scale_m = np.zeros(k + 1)
    scale_m[2:] = [alpha_num * base * 2 // m for m in range(2, k + 1)]
    ab, pair_w = _pairs(hg, scale_m) if alpha_num else (np.zeros((0, 2), dtype=np.int64), np.zeros(0))
    keep = (alpha_den - alpha_num) * base
    weight = np.concatenate([hg.weight_H * keep, pair_w])
    pins_list = [hg.edge_pins[a:b] for a, b in zip(hg.edge_ptr[:-1], hg.edge_ptr[1:])] + list(ab)
    sizes = np.concatenate([size_H, np.full(len(ab), 2)])
    live = weight > 0
    order = np.flatnonzero(live)[np.argsort(-weight[live], kind="stable")]
    ptr = np.concatenate([[0], np.cumsum(sizes[order])]).astype(np.int64)
    pins = np.concatenate([pins_list[i] for i in order]) if len(order) else np.zeros(0, dtype=np.int64)
    return LayerHypergraph(hg.expert_V, hg.replica_V, hg.load_V * scale, hg.single_V * scale, ptr,
                           pins.astype(np.int64), weight[order].astype(np.float64), hg.num_tokens * scale)


@dataclass(frozen=True)
class SmoothingChoice:
    alpha_num: int  # the chosen alpha is alpha_num / ALPHA_DEN
    scores: tuple[tuple[int, float], ...]  # (alpha_num, cross-validated objective per token)
    fits: int  # cross-validation fits run
    capped: bool  # the clock stopped the cross-validation before its fits were done


def fold_of_tokens(num_tokens: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    """[T] a seeded fold per token, the folds' sizes within one of each other."""
    return rng.permutation(np.arange(num_tokens) % folds)


def choose_smoothing(ids_TK: np.ndarray, cnt_E: np.ndarray, start_fn, w_R: np.ndarray, slots_R: np.ndarray,
                     load_weight: float, fetch_VR: np.ndarray | None, rng: np.random.Generator, *,
                     alphas: tuple[int, ...] = DEFAULT_ALPHAS, folds: int = DEFAULT_FOLDS,
                     rounds: int = CV_ROUNDS, deadline: float = float("inf")) -> SmoothingChoice:
    """K-fold cross-validation of alpha on the fitted tokens ``ids_TK`` [T, K] (module
    docstring). ``start_fn(load_E) -> rank_V``: the balanced start of a fit from its training
    folds' per-expert loads. If the clock cuts it, alpha = 0 (the fitted objective) stands."""
    if folds < 2 or ids_TK.shape[0] < folds:
        raise ValueError(f"folds ({folds}) must be >= 2 and <= the {ids_TK.shape[0]} tokens")
    fold_T = fold_of_tokens(ids_TK.shape[0], folds, rng)
    seeds = rng.integers(2**31, size=folds)
    total = {a: 0.0 for a in alphas}
    fits = 0
    for f in range(folds):
        train, test = ids_TK[fold_T != f], ids_TK[fold_T == f]
        hg_train = build_hypergraph(train, cnt_E)
        hg_test = build_hypergraph(test, cnt_E)
        load_E = np.bincount(train[train >= 0], minlength=cnt_E.shape[0]).astype(np.float64)
        start = start_fn(load_E)
        for a in alphas:
            if time.monotonic() > deadline:
                return SmoothingChoice(0, tuple((b, math.nan) for b in alphas), fits, True)
            out = iterated_fm(smoothed_hypergraph(hg_train, a), start, w_R, slots_R, load_weight, fetch_VR,
                              np.random.default_rng(int(seeds[f])), rounds=rounds, swaps=CV_SWAPS,
                              deadline=deadline)
            fits += 1
            total[a] += hg_test.objective(out.rank_V, w_R, load_weight, fetch_VR) * hg_test.num_tokens
    T = float(ids_TK.shape[0])
    scores = tuple((a, total[a] / T) for a in alphas)
    best = min(alphas, key=lambda a: (total[a], a))
    return SmoothingChoice(int(best), scores, fits, False)


def smooth_refine(hg: LayerHypergraph, rank_V: np.ndarray, alpha_num: int, w_R: np.ndarray, slots_R: np.ndarray,
                  load_weight: float, fetch_VR: np.ndarray | None, rng: np.random.Generator, *,
                  rounds: int, swaps: int = CV_SWAPS, deadline: float = float("inf")) -> np.ndarray:
    """The refit: iterated FM on ``hg`` smoothed by ``alpha_num``, from ``rank_V``; returns the
    best assignment under the smoothed objective (``rank_V`` itself when nothing beats it)."""
    out = iterated_fm(smoothed_hypergraph(hg, alpha_num), rank_V, w_R, slots_R, load_weight, fetch_VR, rng,
                      rounds=rounds, swaps=swaps, deadline=deadline)
    return out.rank_V


REFIT_ROUNDS = 24  # iterated-FM rounds of the refit on every fitted token


def smooth_layer_rows(fit, topo: Topology, rows_LS: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list]:
    """Per layer: alpha by cross-validation on ``fit``, then the refit from ``rows_LS[l]``."""
    srank = np.repeat(np.arange(topo.num_ranks), topo.slots_per_rank)
    slots_R, w_R = np.array(topo.slots_per_rank), topo.send_weight_R
    out, choices = [], []
    for l in range(fit.num_layers):
        row = rows_LS[l]
        cnt = np.bincount(row, minlength=fit.num_experts)
        ids = fit.topk_ids_TLK[:, l]
        ch = choose_smoothing(ids, cnt, lambda load: rank_of_vertices(pack_lpt(load, cnt, topo), srank), w_R,
                              slots_R, 0.0, None, np.random.default_rng([seed, l, 2]))
        rank_V = rank_of_vertices(row, srank)
        if ch.alpha_num:
            rank_V = smooth_refine(build_hypergraph(ids, cnt), rank_V, ch.alpha_num, w_R, slots_R, 0.0, None,
                                   np.random.default_rng([seed, l, 3]), rounds=REFIT_ROUNDS)
        out.append(row_from_ranks(rank_V, np.repeat(np.arange(fit.num_experts), cnt), slots_R))
        choices.append(ch)
    return np.stack(out), choices


def run_case(name: str, stats, tname: str, topo: Topology, per_layer_s: float) -> dict:
    fit, held = split_tokens(stats, seed=0)
    res = solve_placement(fit, topo, "ilp", time_limit_s=per_layer_s * fit.num_layers, load_weight=0.0)
    t0 = time.monotonic()
    rows, choices = smooth_layer_rows(fit, topo, res.placement.phy2log_LS)
    cv_s = time.monotonic() - t0
    after = Placement(rows, topo.slots_per_rank, stats.num_experts)
    f0, f1 = (evaluate(fit, p, topo, load_weight=0.0).sends for p in (res.placement, after))
    h0, h1 = (evaluate(held, p, topo, load_weight=0.0).sends for p in (res.placement, after))
    return {"case": name, "topology": tname, "alphas": [c.alpha_num / ALPHA_DEN for c in choices],
            "fit_sends": [f0, f1], "held_sends": [h0, h1], "cv_s": cv_s,
            "cv_scores": [[[a / ALPHA_DEN, round(s, 5)] for a, s in c.scores] for c in choices]}


def _quick_stats():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(12, 0.4), size=4)  # 4 token "topics" with their own experts
    topic = rng.integers(0, 4, 400)
    ids = np.stack([rng.choice(12, 3, replace=False, p=p[t]) for t in topic])[:, None, :]
    return from_topk_ids(ids, 12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=str(TRACES))
    ap.add_argument("--per-layer-s", type=float, default=6.0, help="the ILP pipeline's budget per layer")
    ap.add_argument("--quick", action="store_true", help="one synthetic case (12 experts, 3 ranks)")
    args = ap.parse_args()
    if args.quick:
        cases = [("synthetic", _quick_stats(), {"3 ranks": Topology.for_experts(12, 3)})]
        args.per_layer_s = min(args.per_layer_s, 0.5)
    else:
        traces = Path(args.traces)
        cases = []
        for name, file in (("qwen", "qwen15moe_gsm8k25_5layers.npz"), ("olmoe", "olmoe1b7b_gsm8k25_layer0.npz")):
            stats = load_routing(traces / file)
            E = stats.num_experts
            cases.append((name, stats, {"4 ranks": Topology.for_experts(E, 4), "8 ranks": Topology.for_experts(E, 8),
                                        "2x4 ranks": Topology.for_experts(E, 8, ranks_per_node=4,
                                                                          inter_node_cost=4.0)}))
    out = []
    for name, stats, topos in cases:
        for tname, topo in topos.items():
            r = run_case(name, stats, tname, topo, args.per_layer_s)
            out.append(r)
            print(f"{name:<10}{tname:<10} alpha {r['alphas']}  fitted sends {r['fit_sends'][0]:.5f} -> "
                  f"{r['fit_sends'][1]:.5f}  held-out {r['held_sends'][0]:.5f} -> {r['held_sends'][1]:.5f}  "
                  f"(CV + refit {r['cv_s']:.1f} s)")
    better = sum(r["held_sends"][1] < r["held_sends"][0] - 1e-12 for r in out)
    worse = sum(r["held_sends"][1] > r["held_sends"][0] + 1e-12 for r in out)
    print(json.dumps({"cases": out, "held_better": better, "held_worse": worse,
                      "held_unchanged": len(out) - better - worse}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
