"""Benchmark of moetrain's expert parallelism against DeepSpeed-MoE, on CPU with gloo.

Every figure is measured in the same run as its baseline, with the variants interleaved step by
step (other processes may be loading the CPU), and reported as medians and ratios:

1. layer: training-step tokens/s of one MoE layer (router + dispatch + experts + combine,
   forward + backward + AdamW step) — moetrain ``MoELayer`` + ``AllToAllDispatcher`` with the
   capacity factor DeepSpeed uses, moetrain dropless, and ``deepspeed.moe.layer.MoE`` with the
   same SwiGLU experts (weights copied), gate weights, top-k, capacity factor and world size, with
   token dropping and without (``drop_tokens=False`` pads every expert to the largest count).
   DeepSpeed's Gumbel noise on the 2nd expert and its noisy gate are off, so both route the same.
2. model: the whole moetrain ``Transformer`` vs the same Transformer (same weights) whose MoE
   FFNs are DeepSpeed ``MoE`` layers (``_DSMoEAdapter``); LM loss, dense-gradient all-reduce,
   AdamW step.
3. expert compute: ``GroupedExperts`` forward + backward on a dispatched batch (uneven rows per
   slot from a random router) vs one [N, D] x [D, F] SwiGLU matmul chain with the same FLOPs.
4. all-to-all bytes per step, with and without dedup, counted from the dispatcher's
   ``send_splits`` (off-rank units only), and the measured step time of each, for a *random*
   routing (top-k of uniform random scores) and a *correlated* one (with probability
   ``--corr`` a token picks an adjacent expert pair (2j, 2j+1), which the contiguous placement
   puts on one rank; else two random experts).
5. memory: expert parameter bytes per rank for world sizes 1, 2, 4 (a Transformer built for each
   placement) and the peak RSS of processes that train it for two steps.

6. routing skew x capacity factor (layer and whole model): for each ``--skews`` target (0 =
   balanced) the layer's inputs get x + c*u and gate row e gets s*z[e]*u (model: u = direction of
   each layer's mean MoE input), s bisected until the *measured* global expert load max/mean hits
   the target (real traces: 1.36-1.60 Qwen1.5-MoE, 5.08 OLMoE layer 0). Both systems get the same
   inputs and gate weights, hence choose the same experts (checked: dropless == no-drop outputs).
   Compared: moetrain dropless vs DeepSpeed ``drop_tokens=False`` (pads every expert to the
   largest per-rank count) and moetrain vs DeepSpeed at each capacity factor (DeepSpeed computes
   E*C rows per rank; moetrain only the kept rows; both keep min(count, C) per expert).
   Headline: skew ``--headline-skew`` (1.5), the largest world, whole model, dropless vs no-drop.

Prints a table, then ONE JSON line with every figure (``speedup_vs_deepspeed``, ``target_met``,
``headline``, ``balanced_parity_paired``). ``--quick`` is a ~1 minute version.
Each rank is one process with one intra-op thread (gloo, 127.0.0.1). No CUDA here: a GPU/NCCL
column is added only when ``torch.cuda.is_available()`` and ``torch.cuda.device_count() >= W``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _summ(times: list[float], tokens: int) -> dict:
    med, best = _median(times), min(times)
    return {"median_s": med, "min_s": best, "tokens_per_s": tokens / med, "tokens_per_s_best": tokens / best,
            "times_s": [round(t, 5) for t in times]}


def _ratios(times: dict, fast: str, base: str) -> dict:
    """Speedup of ``fast`` over ``base``: ratio of medians, of minima, and the median of the
    per-round ratios (each round runs both back to back, so shared CPU load cancels best there)."""
    a, b = times[fast], times[base]
    return {"median": _median(b) / _median(a), "best": min(b) / min(a),
            "paired": _median([y / x for x, y in zip(a, b)])}


def _moe_cfg(args, capacity_factor: float, dedup: bool = True):
    from moetrain.config import MoEConfig
    return MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_ffn_dim=args.ffn,
                     capacity_factor=capacity_factor, dedup=dedup)


def _model_cfg(args, capacity_factor: float):
    from moetrain.config import ModelConfig
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       ffn_dim=2 * args.dim, max_seq_len=args.seq, moe=_moe_cfg(args, capacity_factor))


class FixedRouter(nn.Module):
    """A router whose choice of experts is given (``ids_TK``), with weights from the real gate's
    softmax (so the gate still gets gradients). For the dedup traffic study."""

    def __init__(self, router, ids_TK: torch.Tensor):
        super().__init__()
        self.inner = router
        self.register_buffer("ids_TK", ids_TK)

    def forward(self, x_TD):
        from moetrain.model.moe.router import RouterOutput
        logits_TE = F.linear(x_TD.float(), self.inner.gate_ED.float())
        scores_TE = logits_TE.softmax(-1)
        w_TK = scores_TE.gather(1, self.ids_TK)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return RouterOutput(logits_TE, scores_TE, self.ids_TK, w_TK)


def routing_ids(kind: str, T: int, E: int, K: int, corr: float, gen: torch.Generator) -> torch.Tensor:
    """[T, K] distinct experts per token. random: top-k of uniform scores. correlated: with prob
    ``corr`` the pair (2j, 2j+1) (j uniform), else random; K > 2 fills the rest at random."""
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    if kind == "random" or K < 2:
        return ids
    pair = torch.randint(0, E // 2, (T,), generator=gen) * 2
    use = torch.rand(T, generator=gen) < corr
    out = ids.clone()
    out[use, 0], out[use, 1] = pair[use], pair[use] + 1
    if K > 2:  # keep distinct: replace collisions with fresh random experts
        for t in torch.nonzero(use).flatten().tolist():
            rest = [e for e in torch.randperm(E, generator=gen).tolist() if e not in (pair[t], pair[t] + 1)]
            out[t, 2:] = torch.tensor(rest[:K - 2])
    return out


def swiglu_flops(n_rows: int, D: int, Fh: int) -> float:
    """FLOPs of SwiGLU forward + backward over n_rows (3 GEMMs fwd, 6 bwd)."""
    return 2.0 * n_rows * D * Fh * 3 * 3


# ---------------------------------------------------------------------------------------------
# routing skew (both systems see the same inputs and gate weights, hence the same experts)
# ---------------------------------------------------------------------------------------------


def _skew_label(target: float) -> str:
    return "balanced" if target <= 0 else f"skew{target:g}"


def _skew_vectors(D: int, E: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed unit direction u [D] (shared by all layers) and a per-layer load profile z [E]
    (standardised Gaussian: which experts are hot is random, not tied to the placement)."""
    u = torch.randn(D, generator=torch.Generator().manual_seed(11))
    z = torch.randn(E, generator=torch.Generator().manual_seed(101 + layer))
    return u / u.norm(), (z - z.mean()) / z.std()


def _all_counts(local_E: torch.Tensor, ws: int) -> torch.Tensor:
    """[W, E] per-rank expert counts (every rank calls this together)."""
    parts = [torch.zeros_like(local_E) for _ in range(ws)]
    dist.all_gather(parts, local_E.contiguous())
    return torch.stack(parts).cpu()


def _load_ratio(counts_RE: torch.Tensor) -> float:
    tot = counts_RE.sum(0).double()
    return float(tot.max() / tot.mean())


def _calibrate(counts_of, target: float, ws: int, E: int, steps: int = 24):
    """Scale s >= 0 whose routing (``counts_of(s)`` -> this rank's [E] counts) gives a global
    expert load max/mean closest to ``target`` (bisection; every rank calls it together and gets
    the same answer). target <= 0: no skew (s = 0). Returns (s, [W, E] counts at s)."""
    if target <= 0:
        return 0.0, _all_counts(counts_of(0.0), ws)
    c0 = _all_counts(counts_of(0.0), ws)
    best = (abs(_load_ratio(c0) - target), 0.0, c0)
    if _load_ratio(c0) >= target:
        return 0.0, c0
    lo, hi = 0.0, 0.5
    while True:
        c = _all_counts(counts_of(hi), ws)
        r = _load_ratio(c)
        best = min(best, (abs(r - target), hi, c), key=lambda b: b[0])
        if r >= target or hi > 1e4:
            break
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        c = _all_counts(counts_of(mid), ws)
        r = _load_ratio(c)
        best = min(best, (abs(r - target), mid, c), key=lambda b: b[0])
        lo, hi = (mid, hi) if r < target else (lo, mid)
    return best[1], best[2]


def routing_stats(counts_RE, placement_local: list[list[int]], T: int, K: int, cfs) -> dict:
    """Load figures from the per-rank counts [W, E]: global expert max/mean, the busiest rank's
    rows / mean (moetrain dropless computes only real rows, so its slowest rank does this many),
    DeepSpeed no-drop rows (every expert padded to the largest per-rank count, on every rank) and,
    per capacity factor, kept rows, drop share and DeepSpeed's padded rows (E*C per rank)."""
    c = torch.as_tensor(counts_RE, dtype=torch.float64)
    W, E = c.shape
    tot_E = c.sum(0)
    mean_rank_rows = T * K  # real rows per rank on average (W*T*K over W ranks)
    rank_rows = torch.stack([tot_E[idx].sum() for idx in placement_local])
    out = {"expert_max_mean": float(tot_E.max() / tot_E.mean()),
           "rank_max_mean": float(rank_rows.max() / mean_rank_rows),
           "ds_nodrop_rows_ratio": float(E * c.max() / mean_rank_rows),  # DS rows/rank over mean real rows
           "cf": {}}
    for cf in cfs:
        C = max(4, int(math.ceil(cf * T * K / E)))
        kept_E = c.clamp(max=C).sum(0)
        mt_rows = max(float(kept_E[idx].sum()) for idx in placement_local)
        out["cf"][f"cf{cf:g}"] = {"capacity": C, "dropped_share": float(1 - kept_E.sum() / c.sum()),
                                  "mt_busiest_rank_rows_ratio": mt_rows / mean_rank_rows,
                                  "ds_rows_ratio": E * C / mean_rank_rows}
    return out


# ---------------------------------------------------------------------------------------------
# DeepSpeed pieces
# ---------------------------------------------------------------------------------------------


def _ds_moe(args, ws: int, drop_tokens: bool, moe_layer, capacity_factor: float | None = None):
    """A DeepSpeed MoE with the moetrain layer's gate and (SwiGLU) expert weights."""
    from deepspeed.moe.layer import MoE
    from moetrain.model.ffn import SwiGLU
    cf = args.capacity_factor if capacity_factor is None else capacity_factor
    ds = MoE(args.dim, expert=SwiGLU(args.dim, args.ffn), num_experts=args.experts, ep_size=ws,
             k=args.top_k, capacity_factor=cf, eval_capacity_factor=cf,
             min_capacity=4, noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False,
             top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(moe_layer.router.gate_ED)
        ex = moe_layer.experts
        for j, e in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            e.w_gate_FD.copy_(ex.w_gate_SFD[j])
            e.w_up_FD.copy_(ex.w_up_SFD[j])
            e.w_down_DF.copy_(ex.w_down_SDF[j])
    return ds


def _make_adapter_cls():
    from moetrain.model.moe.layer import MoELayer
    from moetrain.model.moe.router import RouterOutput

    class DSMoEAdapter(MoELayer):
        """Drop-in for a moetrain MoELayer inside ``Block``: DeepSpeed MoE on [B, T, D], returns
        (y, RouterOutput) with empty routing tensors (the benchmark loss is LM only)."""

        def __init__(self, ds_moe):
            nn.Module.__init__(self)
            self.ds = ds_moe
            self.dispatcher = None

        def forward(self, x_BTD):
            y, _l_aux, _counts = self.ds(x_BTD)
            empty = x_BTD.new_zeros(0)
            return y, RouterOutput(empty, empty, empty.long(), empty)

    return DSMoEAdapter


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def interleaved(steps: dict, warmup: int, iters: int, barrier) -> dict[str, list[float]]:
    """Run every variant's step once per round, rotating the order; returns seconds per step
    (the slowest rank's, via barriers around each step)."""
    names = list(steps)
    times = {n: [] for n in names}
    for i in range(warmup + iters):
        rot = names[i % len(names):] + names[:i % len(names)]
        for n in rot:
            barrier()
            t0 = time.perf_counter()
            steps[n]()
            barrier()
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def _train_step_fn(forward_loss, params, sync=None):
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward_loss()
        loss.backward()
        if sync is not None:
            sync()
        opt.step()
    return step


# ---------------------------------------------------------------------------------------------
# the distributed worker (one rank)
# ---------------------------------------------------------------------------------------------


def _worker(rank: int, ws: int, port: int, args, queue, device_kind: str) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(ws), LOCAL_RANK=str(rank), LOCAL_SIZE=str(ws))
        backend = "nccl" if device_kind == "cuda" else "gloo"
        device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=300))
        rss0 = _rss_mb()
        out = _run_rank(rank, ws, args, device)
        out["rss_after_init_mb"] = rss0
        out["peak_rss_mb"] = _peak_rss_mb()
        queue.put((rank, out))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_rank(rank: int, ws: int, args, device) -> dict:
    from moetrain.model.moe.layer import MoELayer
    from moetrain.parallel import grads
    from moetrain.parallel.context import ParallelContext
    from moetrain.parallel.dispatcher import AllToAllDispatcher
    from placement.placement import Placement

    ctx = ParallelContext(rank=rank, world_size=ws, device=device)
    if device.type == "cuda":
        def barrier():
            torch.cuda.synchronize()
            ctx.barrier()
    else:
        barrier = ctx.barrier
    res: dict = {}
    ds_ok = args.deepspeed
    if ds_ok:
        import deepspeed
        import deepspeed.comm
        t0 = time.perf_counter()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        res["ds_init_s"] = time.perf_counter() - t0
    D, E, K, T = args.dim, args.experts, args.top_k, args.tokens
    cf = args.capacity_factor
    placement1 = Placement.contiguous(1, E, ws)
    local = placement1.local_experts(0, rank).tolist()

    gate0_ED = torch.randn(E, D, generator=torch.Generator().manual_seed(7)) * args.gate_std

    def moe_layer(capacity_factor, dedup=True, gate_ED=None):
        layer = MoELayer(D, _moe_cfg(args, capacity_factor, dedup), layer_index=0, seed=0, local_experts=local,
                         init_std=0.02).to(device)
        with torch.no_grad():  # the gate is zeros by construction: same random gate on every rank
            layer.router.gate_ED.copy_(gate0_ED if gate_ED is None else gate_ED)
        layer.dispatcher = AllToAllDispatcher(placement1, 0, ctx, capacity_factor=capacity_factor, dedup=dedup)
        return layer

    g = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(T, D, generator=g).to(device)
    tgt_TD = torch.randn(T, D, generator=g).to(device)

    # ---- 1. layer: every routing skew x (dropless | capacity factors), all variants interleaved --
    # skew s: x = x0 + c*u (u a fixed unit vector, c = skew_c * typical |x0|), gate row e += b_e*u
    # with b = scale * z (z a fixed random profile over experts); scale calibrated so the measured
    # global expert load max/mean hits the target. moetrain and DeepSpeed get the same x and gate.
    u_D, _ = _skew_vectors(D, E, 0)
    steps, stats, layers, grid = {}, {}, {}, {}
    for sk in args.skew_list:
        lab = _skew_label(sk)
        _, z_E = _skew_vectors(D, E, 0)
        xs_TD = x_TD + (args.skew_c * float(x_TD.norm(dim=1).mean())) * u_D.to(device) if sk > 0 else x_TD

        # the base gate's own component along u would bias the experts by itself: project it out
        g_perp_ED = gate0_ED - torch.outer(gate0_ED @ u_D, u_D) if sk > 0 else gate0_ED

        def gate_of(scale, z_E=z_E, g_perp_ED=g_perp_ED):
            return g_perp_ED + scale * torch.outer(z_E, u_D)

        def counts_of(scale, xs_TD=xs_TD, gate_of=gate_of):
            ids = F.linear(xs_TD.float(), gate_of(scale).to(device)).topk(K, dim=-1).indices
            return torch.bincount(ids.flatten(), minlength=E)
        scale, counts_RE = _calibrate(counts_of, sk, ws, E)
        gate_ED = gate_of(scale)
        grid[lab] = {"target": sk, "scale": scale, "counts_RE": counts_RE.tolist(), "dropped": {}}
        for cf_name, c in [("dropless", 0.0)] + [(f"cf{c:g}", c) for c in args.cf_list]:
            layer = moe_layer(c, gate_ED=gate_ED)
            name = f"{lab}/mt_{cf_name}"
            layers[name] = layer
            xin = xs_TD.clone().requires_grad_(True)

            def fl(layer=layer, xin=xin, name=name, lab=lab, cf_name=cf_name):
                y, route = layer(xin.unsqueeze(0))
                grid[lab]["dropped"][f"mt_{cf_name}"] = route.num_dropped
                return (y.squeeze(0) - tgt_TD).pow(2).mean()
            steps[name] = _train_step_fn(fl, list(layer.parameters()))
            if not ds_ok:
                continue
            dname = f"{lab}/ds_{'nodrop' if c == 0 else cf_name}"
            ds = _ds_moe(args, ws, c > 0, layer, capacity_factor=c if c > 0 else 1.0).to(device)
            layers[dname] = ds
            xin = xs_TD.clone().requires_grad_(True)

            def fl(ds=ds, xin=xin):
                y, _, _ = ds(xin.unsqueeze(0))
                return (y.squeeze(0) - tgt_TD).pow(2).mean()
            steps[dname] = _train_step_fn(fl, list(ds.parameters()))
        if ds_ok:  # same routing, same weights: dropless moetrain == DeepSpeed no-drop
            with torch.no_grad():
                y_mt = layers[f"{lab}/mt_dropless"](xs_TD.unsqueeze(0))[0]
                y_ds = layers[f"{lab}/ds_nodrop"](xs_TD.unsqueeze(0))[0]
                grid[lab]["maxdiff_mt_dropless_vs_ds_nodrop"] = float((y_mt - y_ds).abs().max())
                for c in args.cf_list:  # same kept count per expert; which pairs are kept may differ
                    y_mt = layers[f"{lab}/mt_cf{c:g}"](xs_TD.unsqueeze(0))[0]
                    y_ds = layers[f"{lab}/ds_cf{c:g}"](xs_TD.unsqueeze(0))[0]
                    grid[lab][f"maxdiff_cf{c:g}"] = float((y_mt - y_ds).abs().max())
    t = interleaved(steps, args.warmup, args.iters, barrier)
    res["layer_grid"] = {"times": t, "skews": grid}
    # legacy section-1 view: balanced routing, --capacity-factor
    bal, cfn = _skew_label(0.0), f"cf{cf:g}"
    legacy = {"mt_cap": f"{bal}/mt_{cfn}", "mt_dropless": f"{bal}/mt_dropless", "ds_cap": f"{bal}/ds_{cfn}",
              "ds_nodrop": f"{bal}/ds_nodrop"}
    res["layer_times"] = {k: t[v] for k, v in legacy.items() if v in t}
    res["layer_dropped"] = {k: grid[bal]["dropped"].get(v.split("/")[1]) for k, v in legacy.items()
                            if k.startswith("mt")} if bal in grid else {}
    if bal in grid and "maxdiff_mt_dropless_vs_ds_nodrop" in grid[bal]:
        res["layer_maxdiff_dropless_vs_ds_nodrop"] = grid[bal]["maxdiff_mt_dropless_vs_ds_nodrop"]
    steps = {k: steps[v] for k, v in legacy.items() if v in steps}
    if args.profile and rank == 0:
        res["profile"] = {n: _profile(steps[n]) for n in steps}
    elif args.profile:
        for n in steps:
            _profile(steps[n])
    del steps, layers

    # ---- 4. dedup traffic ----------------------------------------------------------------------
    res["dedup"] = {}
    for kind in ("random", "correlated"):
        gk = torch.Generator().manual_seed(2000 + rank)
        ids = routing_ids(kind, T, E, K, args.corr, gk).to(device)
        dsteps, sent = {}, {}
        for dedup in (True, False):
            layer = moe_layer(0.0, dedup)
            layer.router = FixedRouter(layer.router, ids)
            disp = layer.dispatcher
            name = "dedup" if dedup else "nodedup"
            with torch.no_grad():
                r = layer.router(x_TD)
                _, meta = disp.dispatch(x_TD, r.topk_ids_TK, r.topk_weights_TK)
            off_units = sum(meta.send_splits) - meta.send_splits[rank]
            off_recv = sum(meta.recv_splits) - meta.recv_splits[rank]
            sent[name] = {"units_off_rank": off_units, "units_total": sum(meta.send_splits),
                          "units_recv_off_rank": off_recv}
            xin = x_TD.clone().requires_grad_(True)

            def fl(layer=layer, xin=xin):
                y, _ = layer(xin.unsqueeze(0))
                return (y.squeeze(0) - tgt_TD).pow(2).mean()
            dsteps[name] = _train_step_fn(fl, list(layer.parameters()))
        res["dedup"][kind] = {"sent": sent,
                              "times": interleaved(dsteps, 1, max(3, args.iters // 2), barrier)}
        del dsteps

    # ---- 2. whole model ------------------------------------------------------------------------
    if args.model_iters > 0:
        mg = _model_bench(rank, ws, args, ctx, device, ds_ok, barrier)
        res["model_grid"] = mg
        bal, cfn = _skew_label(0.0), f"cf{args.capacity_factor:g}"
        legacy = {"mt_cap": f"{bal}/mt_{cfn}", "mt_dropless": f"{bal}/mt_dropless", "ds_cap": f"{bal}/ds_{cfn}",
                  "ds_nodrop": f"{bal}/ds_nodrop"}
        res["model_times"] = {k: mg["times"][v] for k, v in legacy.items() if v in mg["times"]}
    barrier()
    return res


def _model_bench(rank, ws, args, ctx, device, ds_ok, barrier) -> dict:
    """Whole-model train steps for every skew in ``--model-skews`` x (dropless / DS no-drop,
    moetrain / DS at every ``--model-cfs``), all interleaved. Skew: router row e of layer l gets
    s_l*z_l[e]*u_l, u_l the unit direction of the mean MoE input of layer l (over all ranks'
    tokens: the component every token shares, so this acts as a per-expert bias); s_l calibrated
    layer by layer on the real MoE inputs so each layer's expert load max/mean hits the target
    (a layer whose unskewed load already exceeds it keeps s_l = 0). The embeddings are untouched."""
    from moetrain import losses
    from moetrain.model import Transformer
    from moetrain.parallel import grads
    from moetrain.parallel.dispatcher import AllToAllDispatcher
    from placement.placement import Placement

    base = _model_cfg(args, 0.0)
    L = base.n_layers  # every block is MoE (every_n_layers=1)
    E, K, D = args.experts, args.top_k, args.dim
    placement = Placement.contiguous(L, E, ws)
    B = max(1, args.tokens // args.seq)
    g = torch.Generator().manual_seed(3000 + rank)
    tok = torch.randint(0, args.vocab, (B, args.seq + 1), generator=g).to(device)
    x, y = tok[:, :-1], tok[:, 1:]
    def build(capacity_factor, spec=None):
        m = Transformer(_model_cfg(args, capacity_factor), seed=0, placement=placement, rank=rank).to(device)
        for i, layer in enumerate(m.moe_layers()):
            layer.dispatcher = AllToAllDispatcher(placement, i, ctx, capacity_factor=capacity_factor, dedup=True)
        if spec is not None:
            apply_spec(m, spec)
        return m

    def apply_spec(m, spec):
        with torch.no_grad():
            for i, layer in enumerate(m.moe_layers()):
                if spec["scales"][i]:
                    z_E = _skew_vectors(D, E, i)[1].to(device)
                    u_l = torch.tensor(spec["u"][i], dtype=torch.float32, device=device)
                    layer.router.gate_ED.add_(spec["scales"][i] * torch.outer(z_E, u_l))

    def layer_counts(m):
        """[L] of [W, E] routing counts of one no-grad forward."""
        with torch.no_grad():
            _, routes = m(x)
        return [_all_counts(torch.bincount(r.topk_ids_TK.flatten(), minlength=E), ws) for r in routes]

    steps, info = {}, {}
    for sk in args.model_skew_list:
        lab = _skew_label(sk)
        probe = build(0.0)
        spec = {"scales": [0.0] * L, "u": [None] * L}
        if sk > 0:
            for i, layer in enumerate(probe.moe_layers()):
                captured = {}
                h = layer.register_forward_pre_hook(lambda mod, a, captured=captured: captured.setdefault("x", a[0]))
                with torch.no_grad():
                    probe(x)
                h.remove()
                x_TD = captured["x"].reshape(-1, D).float()
                # u_l: the direction of the mean MoE input over all ranks' tokens (the component
                # every token shares), so a gate row along it biases that expert for all tokens
                mean_D = x_TD.sum(0)
                dist.all_reduce(mean_D)
                u_l = mean_D / mean_D.norm()
                spec["u"][i] = u_l.cpu().tolist()
                g0_ED = layer.router.gate_ED.detach().clone()
                z_E = _skew_vectors(D, E, i)[1].to(device)

                def counts_of(scale, x_TD=x_TD, g0_ED=g0_ED, z_E=z_E, u_l=u_l):
                    ids = F.linear(x_TD, g0_ED + scale * torch.outer(z_E, u_l)).topk(K, dim=-1).indices
                    return torch.bincount(ids.flatten(), minlength=E)
                spec["scales"][i] = _calibrate(counts_of, sk, ws, E)[0]
                with torch.no_grad():
                    layer.router.gate_ED.copy_(g0_ED + spec["scales"][i] * torch.outer(z_E, u_l))
        info[lab] = {"target": sk, "spec": {"scales": spec["scales"]},
                     "counts_LRE": [c.tolist() for c in layer_counts(probe)]}
        del probe
        variants = [("mt_dropless", 0.0, False)] + ([("ds_nodrop", 0.0, True)] if ds_ok else [])
        for c in args.model_cf_list:
            variants += [(f"mt_cf{c:g}", c, False)] + ([(f"ds_cf{c:g}", c, True)] if ds_ok else [])
        built = {}
        for name, c, is_ds in variants:
            m = build(c, spec)
            if is_ds:
                Adapter = _make_adapter_cls()
                for blk in m.blocks:
                    blk.ffn = Adapter(_ds_moe(args, ws, c > 0, blk.ffn, capacity_factor=c if c > 0 else 1.0)).to(device)
                dense = [p for p in m.parameters() if getattr(p, "allreduce", True)]
                expert = [p for p in m.parameters() if not getattr(p, "allreduce", True)]

                def sync(dense=dense, expert=expert):
                    grads.sync_dense_grads(dense, ctx)
                    for p in expert:  # same scaling as moetrain's expert grads
                        if p.grad is not None:
                            p.grad.div_(ws)
            else:
                dense = [p for _, p in m.dense_parameters()]
                moe_layers = m.moe_layers()

                def sync(dense=dense, moe_layers=moe_layers):
                    grads.sync_dense_grads(dense, ctx)
                    grads.sync_expert_grads(moe_layers, placement, ctx)

            def fl(m=m):
                logits, _ = m(x)
                return losses.lm_loss(logits, y)
            steps[f"{lab}/{name}"] = _train_step_fn(fl, list(m.parameters()), sync)
            built[name] = m
        if ds_ok:  # same routing in every layer: dropless moetrain == DeepSpeed no-drop (logits)
            with torch.no_grad():
                a = built["mt_dropless"](x)[0]
                b = built["ds_nodrop"](x)[0]
                info[lab]["maxdiff_logits_mt_dropless_vs_ds_nodrop"] = float((a - b).abs().max())
    return {"times": interleaved(steps, 1, args.model_iters, barrier), "skews": info}


_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def _profile(step, repeats: int = 3) -> dict:
    """Self CPU ms of one step (min over ``repeats`` profiled steps) split into GEMMs, collectives
    (all-to-all / all-reduce incl. waiting for the slowest rank) and everything else (routing,
    gathers, scatters, elementwise, optimizer), plus the top non-GEMM ops."""
    from torch.profiler import ProfilerActivity, profile
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = time.perf_counter() - t0
        cat = {"gemm": 0.0, "comm": 0.0, "other": 0.0}
        per_op = []
        for ev in prof.key_averages():
            ms = ev.self_cpu_time_total / 1e3
            k = ev.key
            if k in _GEMM_OPS:
                cat["gemm"] += ms
            elif "alltoall" in k.lower() or "all_reduce" in k.lower() or "allreduce" in k.lower() \
                    or "barrier" in k.lower():
                cat["comm"] += ms
            else:
                cat["other"] += ms
                per_op.append((ms, k, ev.count))
        rec = {**{c: round(v, 2) for c, v in cat.items()}, "wall_ms": round(wall * 1e3, 1),
               "top_other": [[k, round(ms, 2), n] for ms, k, n in sorted(per_op, reverse=True)[:6]]}
        if best is None or rec["wall_ms"] < best["wall_ms"]:
            best = rec
    return best


def run_group(ws: int, args, target=_worker, extra=(), device_kind="cpu", timeout=900) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, ws, port, args, queue, device_kind) + tuple(extra))
             for r in range(ws)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(ws):
            r, out = queue.get(timeout=timeout)
            results[r] = out
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [o["error"] for o in results.values() if "error" in o]
    if errors:
        raise RuntimeError(f"world {ws} failed:\n{errors[0]}")
    return results


# ---------------------------------------------------------------------------------------------
# 3. expert compute efficiency (single process)
# ---------------------------------------------------------------------------------------------


def expert_efficiency(args, ws: int, threads: int) -> dict:
    from moetrain.model.moe.experts import GroupedExperts
    torch.set_num_threads(threads)
    D, Fh, E, K, T = args.dim, args.ffn, args.experts, args.top_k, args.tokens
    S = E // ws
    g = torch.Generator().manual_seed(5)
    # a realistic dispatched batch: all W ranks' tokens routed by a random gate, rows for this
    # rank's S experts (uneven counts)
    logits = torch.randn(T * ws, D, generator=g) @ (torch.randn(D, E, generator=g) * args.gate_std)
    ids = logits.topk(K, dim=1).indices.flatten()
    counts = torch.bincount(ids, minlength=E)[:S].tolist()
    N = sum(counts)
    experts = GroupedExperts(list(range(S)), D, Fh, seed=0, layer_index=0, init_std=0.02)
    x = torch.randn(N, D, generator=g).requires_grad_(True)
    gy = torch.randn(N, D, generator=g)
    wg = (torch.randn(Fh, D, generator=g) * 0.02).requires_grad_(True)
    wu = (torch.randn(Fh, D, generator=g) * 0.02).requires_grad_(True)
    wd = (torch.randn(D, Fh, generator=g) * 0.02).requires_grad_(True)

    def grouped():
        experts.zero_grad(set_to_none=True)
        x.grad = None
        experts(x, counts).backward(gy)

    def raw():
        for p in (wg, wu, wd, x):
            p.grad = None
        h = F.silu(x @ wg.t()) * (x @ wu.t())
        (h @ wd.t()).backward(gy)

    times = interleaved({"grouped": grouped, "raw": raw}, 3, args.eff_iters, lambda: None)
    tg, tr = min(times["grouped"]), min(times["raw"])
    tgm, trm = _median(times["grouped"]), _median(times["raw"])
    torch.set_num_threads(args.threads_main)
    return {"world": ws, "threads": threads, "slots": S, "rows": N, "rows_per_slot": counts,
            "grouped_ms": tgm * 1e3, "raw_ms": trm * 1e3, "efficiency_median": trm / tgm,
            "efficiency_paired": _median([r / g_ for g_, r in zip(times["grouped"], times["raw"])]),
            "efficiency_best": tr / tg, "grouped_gflops": swiglu_flops(N, D, Fh) / tgm / 1e9}


# ---------------------------------------------------------------------------------------------
# 5. memory
# ---------------------------------------------------------------------------------------------


def _mem_worker(rank: int, ws: int, port: int, args, queue, device_kind: str) -> None:
    try:
        torch.set_num_threads(1)
        from moetrain import losses
        from moetrain.model import Transformer
        from moetrain.parallel.context import ParallelContext
        from moetrain.parallel.dispatcher import AllToAllDispatcher
        from placement.placement import Placement
        if ws > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=300))
        ctx = ParallelContext(rank=rank, world_size=ws)
        rss0 = _rss_mb()
        cfg = _model_cfg(args, 0.0)
        cfg.moe.expert_ffn_dim = args.mem_ffn
        placement = Placement.contiguous(cfg.n_layers, args.experts, ws)
        m = Transformer(cfg, seed=0, placement=placement, rank=rank)
        if ws > 1:
            for i, layer in enumerate(m.moe_layers()):
                layer.dispatcher = AllToAllDispatcher(placement, i, ctx, dedup=True)
        expert_bytes = sum(p.numel() * p.element_size() for _, p in m.expert_parameters())
        dense_bytes = sum(p.numel() * p.element_size() for _, p in m.dense_parameters())
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=False)
        B = max(1, args.mem_tokens // args.seq)
        tok = torch.randint(0, args.vocab, (B, args.seq + 1), generator=torch.Generator().manual_seed(rank))
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            logits, _ = m(tok[:, :-1])
            losses.lm_loss(logits, tok[:, 1:]).backward()
            opt.step()
        queue.put((rank, {"expert_param_bytes": expert_bytes, "dense_param_bytes": dense_bytes,
                          "rss_before_model_mb": rss0, "peak_rss_mb": _peak_rss_mb()}))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1 minute: world 2 only, fewer iterations")
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert hidden dim F")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--gate-std", type=float, default=0.02,
                   help="std of the random gate (x ~ N(0,1)); top-k is scale-invariant, so this sharpens the weights "
                        "but does not change which experts are chosen (loads stay mildly uneven, ~3%% dropped at cf=1)")
    p.add_argument("--skews", default="0,1.5",
                   help="target global expert load max/mean of the layer study (0 = balanced: no skew component)")
    p.add_argument("--cfs", default="1.0,1.25,2.0", help="capacity factors of the layer study (with dropping)")
    p.add_argument("--model-skews", default="0,1.5")
    p.add_argument("--model-cfs", default="1.0,2.0", help="(1.25 too with --model-cfs 1.0,1.25,2.0: +~90 s)")
    p.add_argument("--skew-c", type=float, default=0.25,
                   help="layer study: size of the shared input direction u, as a fraction of the mean input-row norm")
    p.add_argument("--headline-skew", type=float, default=1.5)
    p.add_argument("--corr", type=float, default=0.9, help="share of tokens routed to a co-located pair")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--eff-iters", type=int, default=10)
    # whole model
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--model-iters", type=int, default=3)
    # memory
    p.add_argument("--mem-ffn", type=int, default=1024)
    p.add_argument("--mem-tokens", type=int, default=512)
    p.add_argument("--mem-world-sizes", default="1,2,4")
    p.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of one step of each layer variant")
    p.add_argument("--threads-main", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; values given on the command line win
        quick = dict(world_sizes="2", iters=5, warmup=2, model_iters=3, eff_iters=8, mem_world_sizes="1,2",
                     cfs="1.0,2.0", model_cfs="1.0")
        for k, v in quick.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    fl = lambda v: sorted({float(x) for x in v.split(",") if x})  # noqa: E731
    args.skew_list = fl(args.skews + ",0")
    args.cf_list = fl(args.cfs + f",{args.capacity_factor}")
    args.model_skew_list = fl(args.model_skews + ",0")
    args.model_cf_list = fl(args.model_cfs + f",{args.capacity_factor}")
    args.world_list = [int(w) for w in args.world_sizes.split(",") if w]
    args.mem_world_list = [int(w) for w in args.mem_world_sizes.split(",") if w]
    return args


def _fmt(x, nd=1):
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads_main)
    cuda = torch.cuda.is_available()
    D, E, K, T = args.dim, args.experts, args.top_k, args.tokens
    print(f"bench_ep: D={D} F={args.ffn} E={E} k={K} T={T}/rank cf={args.capacity_factor} "
          f"worlds={args.world_list} torch={torch.__version__} 1 thread/rank, gloo on 127.0.0.1")
    if not cuda:
        print("CUDA is not available: CPU/gloo only, no GPU/NCCL column.")
    out: dict = {"config": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
                 "cuda_available": cuda, "cpu_count": os.cpu_count(), "layer": {}, "model": {},
                 "dedup": {}, "expert_efficiency": [], "memory": {}, "gpu": None,
                 "skew": {"layer": {}, "model": {}}}
    if args.deepspeed:
        import deepspeed
        out["deepspeed_version"] = deepspeed.__version__

    # 3. expert compute efficiency (main process, before the groups load the CPU)
    for ws in args.world_list:
        out["expert_efficiency"].append(expert_efficiency(args, ws, 1))

    for ws in args.world_list:
        if E % ws:
            print(f"skip world {ws}: {E} experts do not divide")
            continue
        res = run_group(ws, args)
        r0 = res[0]
        lt = r0["layer_times"]
        lay = {n: _summ(v, ws * T) for n, v in lt.items()}
        lay["dropped_pairs_rank0"] = r0["layer_dropped"]
        if "layer_maxdiff_dropless_vs_ds_nodrop" in r0:
            lay["maxdiff_mt_dropless_vs_ds_nodrop"] = r0["layer_maxdiff_dropless_vs_ds_nodrop"]
            lay["ds_init_s"] = r0.get("ds_init_s")
        if "ds_cap" in lt:
            lay["speedup"] = {"mt_cap_vs_ds_cap": _ratios(lt, "mt_cap", "ds_cap"),
                              "mt_dropless_vs_ds_cap": _ratios(lt, "mt_dropless", "ds_cap"),
                              "mt_dropless_vs_ds_nodrop": _ratios(lt, "mt_dropless", "ds_nodrop")}
        if "profile" in r0:
            lay["profile_rank0"] = r0["profile"]
        out["layer"][str(ws)] = lay
        if "model_times" in r0:
            mt = r0["model_times"]
            model_tokens = ws * max(1, T // args.seq) * args.seq
            mod = {n: _summ(v, model_tokens) for n, v in mt.items()}
            if "ds_cap" in mt:
                mod["speedup"] = {"mt_cap_vs_ds_cap": _ratios(mt, "mt_cap", "ds_cap"),
                                  "mt_dropless_vs_ds_cap": _ratios(mt, "mt_dropless", "ds_cap")}
                if "ds_nodrop" in mt:
                    mod["speedup"]["mt_dropless_vs_ds_nodrop"] = _ratios(mt, "mt_dropless", "ds_nodrop")
            out["model"][str(ws)] = mod
        out["skew"]["layer"][str(ws)] = _skew_summary(r0["layer_grid"], args, ws, ws * T, model=False)
        if "model_grid" in r0:
            out["skew"]["model"][str(ws)] = _skew_summary(r0["model_grid"], args, ws,
                                                          ws * max(1, T // args.seq) * args.seq, model=True)
        dd = {}
        for kind, v in r0["dedup"].items():
            row = {"routing": kind}
            for name in ("dedup", "nodedup"):
                units = sum(res[r]["dedup"][kind]["sent"][name]["units_off_rank"] for r in range(ws))
                # per step, all ranks: dispatch payload (D + K floats) + slot metadata (K int64) +
                # splits (R int64) forward; the same payload back in backward (grad of dispatch);
                # combine rows (D floats) forward and their grads backward.
                fwd_dispatch = units * (D + K) * 4 + units * K * 8 + ws * (ws - 1) * 8
                combine = units * D * 4
                row[name] = {"units_off_rank": units, "x_row_bytes": units * D * 4,
                             "bytes_fwd": fwd_dispatch + combine,
                             "bytes_step": 2 * (units * (D + K) * 4 + combine) + units * K * 8 + ws * (ws - 1) * 8,
                             "median_s": _median(v["times"][name])}
            row["bytes_ratio"] = row["dedup"]["bytes_step"] / max(1, row["nodedup"]["bytes_step"])
            row["time_ratio"] = row["dedup"]["median_s"] / row["nodedup"]["median_s"]
            row["time_ratio_paired"] = 1.0 / _ratios(v["times"], "dedup", "nodedup")["paired"]
            dd[kind] = row
        out["dedup"][str(ws)] = dd
        out.setdefault("rss", {})[str(ws)] = {"peak_rss_mb_per_rank": [res[r]["peak_rss_mb"] for r in range(ws)]}
        print(f"  world {ws} done at {time.perf_counter() - t_start:.0f} s")

    # GPU/NCCL column: the layer and dedup sections again, one GPU per rank (only with CUDA)
    if cuda:
        out["gpu"] = {}
        for ws in args.world_list:
            if torch.cuda.device_count() < ws or E % ws:
                continue
            gargs = copy.copy(args)
            gargs.model_iters, gargs.profile = 0, False
            res = run_group(ws, gargs, device_kind="cuda")
            out["gpu"][str(ws)] = {n: _summ(v, ws * T) for n, v in res[0]["layer_times"].items()}

    # 5. memory
    for ws in args.mem_world_list:
        if E % ws:
            continue
        res = run_group(ws, args, target=_mem_worker)
        out["memory"][str(ws)] = {
            "expert_param_bytes_per_rank": res[0]["expert_param_bytes"],
            "dense_param_bytes_per_rank": res[0]["dense_param_bytes"],
            "peak_rss_mb_per_rank": [res[r]["peak_rss_mb"] for r in range(ws)],
            "rss_before_model_mb": [res[r]["rss_before_model_mb"] for r in range(ws)]}
    if "1" in out["memory"]:
        b1 = out["memory"]["1"]["expert_param_bytes_per_rank"]
        for ws, m in out["memory"].items():
            m["expert_bytes_ratio_vs_1"] = m["expert_param_bytes_per_rank"] / b1
    out["elapsed_s"] = time.perf_counter() - t_start
    hl = headline(out, args)
    out["headline"] = hl
    out["speedup_vs_deepspeed"] = hl["speedup_vs_deepspeed"]
    out["target_met"] = hl["target_met"]
    bal = {}
    for scope in ("layer", "model"):
        for ws, byskew in out["skew"][scope].items():
            if "balanced" in byskew:
                bal[f"{scope}_w{ws}"] = {k: round(v["paired"], 3) for k, v in byskew["balanced"]["speedup"].items()}
    out["balanced_parity_paired"] = bal
    print_table(out, args)
    print(json.dumps(out, default=float, separators=(",", ":")))
    return out


def _skew_summary(grid: dict, args, ws: int, tokens: int, model: bool) -> dict:
    """Per skew: routing figures from the measured counts, per-variant timings, and the speedups
    of moetrain over DeepSpeed for dropless vs no-drop and for every capacity factor."""
    from placement.placement import Placement
    E, K = args.experts, args.top_k
    T_rank = max(1, args.tokens // args.seq) * args.seq if model else args.tokens
    local = [Placement.contiguous(1, E, ws).local_experts(0, r).tolist() for r in range(ws)]
    cfs = args.model_cf_list if model else args.cf_list
    t = grid["times"]
    out = {}
    for lab, info in grid["skews"].items():
        row = {"target": info["target"]}
        if model:
            row["routing_per_layer"] = [routing_stats(c, local, T_rank, K, cfs) for c in info["counts_LRE"]]
            row["scales"] = info["spec"]["scales"]
            row["maxdiff_logits_mt_dropless_vs_ds_nodrop"] = info.get("maxdiff_logits_mt_dropless_vs_ds_nodrop")
        else:
            row["routing"] = routing_stats(info["counts_RE"], local, T_rank, K, cfs)
            row["scale"] = info["scale"]
            row["dropped_pairs_rank0"] = info["dropped"]
            row.update({k: v for k, v in info.items() if k.startswith("maxdiff")})
        tt = {n.split("/", 1)[1]: v for n, v in t.items() if n.startswith(lab + "/")}
        row["times"] = {n: _summ(v, tokens) for n, v in tt.items()}
        sp = {}
        if "ds_nodrop" in tt:
            sp["dropless_vs_ds_nodrop"] = _ratios(tt, "mt_dropless", "ds_nodrop")
        for c in cfs:
            if f"ds_cf{c:g}" in tt:
                sp[f"cf{c:g}_vs_ds_cf{c:g}"] = _ratios(tt, f"mt_cf{c:g}", f"ds_cf{c:g}")
                sp[f"dropless_vs_ds_cf{c:g}"] = _ratios(tt, "mt_dropless", f"ds_cf{c:g}")
        row["speedup"] = sp
        out[lab] = row
    return out


def _skew_table(out, args) -> None:
    print("== 6. Routing skew x capacity factor: moetrain vs DeepSpeed (same inputs, gates, chosen experts) ==")
    print("  load = measured global expert load max/mean (model: per MoE layer); rank = busiest rank's real rows /"
          " mean; rows mt/ds = rows computed on moetrain's busiest rank / DeepSpeed's rows per rank")
    print(f"{'scope':<6}{'world':>5} {'routing':<10} {'load':>11} {'rank':>5} {'pair (mt vs ds)':<26} {'mt ms':>7} "
          f"{'ds ms':>7} {'x med / paired / best':>22} {'rows mt/ds':>11} {'dropped':>8}")
    for scope in ("layer", "model"):
        for ws, byskew in out["skew"][scope].items():
            for lab, row in byskew.items():
                rs = row["routing_per_layer"] if scope == "model" else [row["routing"]]
                load = ",".join(f"{r['expert_max_mean']:.2f}" for r in rs)
                rank = max(r["rank_max_mean"] for r in rs)
                pairs = [("dropless", "mt_dropless", "ds_nodrop", "dropless vs no-drop")]
                cfs = args.model_cf_list if scope == "model" else args.cf_list
                pairs += [(f"cf{c:g}", f"mt_cf{c:g}", f"ds_cf{c:g}", f"cf {c:g} vs cf {c:g}") for c in cfs]
                for key, a, b, title in pairs:
                    tm = row["times"]
                    if a not in tm or b not in tm:
                        continue
                    sp = row["speedup"][f"{key}_vs_{b}" if key != "dropless" else "dropless_vs_ds_nodrop"]
                    if key == "dropless":
                        mtr = max(r["rank_max_mean"] for r in rs)
                        dsr = max(r["ds_nodrop_rows_ratio"] for r in rs)
                        drop = 0.0
                    else:
                        mtr = max(r["cf"][key]["mt_busiest_rank_rows_ratio"] for r in rs)
                        dsr = max(r["cf"][key]["ds_rows_ratio"] for r in rs)
                        drop = max(r["cf"][key]["dropped_share"] for r in rs)
                    print(f"{scope:<6}{ws:>5} {lab:<10} {load:>11} {rank:>5.2f} {title:<26} "
                          f"{tm[a]['median_s']*1e3:>7.1f} {tm[b]['median_s']*1e3:>7.1f} "
                          f"{sp['median']:>6.2f} / {sp['paired']:.2f} / {sp['best']:.2f} "
                          f"{mtr:>5.2f}/{dsr:<5.2f} {drop*100:>7.1f}%")
            for lab, row in byskew.items():
                md = row.get("maxdiff_mt_dropless_vs_ds_nodrop", row.get("maxdiff_logits_mt_dropless_vs_ds_nodrop"))
                if md is not None:
                    print(f"  {scope} world {ws} {lab}: |mt_dropless - ds_nodrop| max = {md:.1e} (same routing)"
                          + (f", skew scales {', '.join(f'{x:.3g}' for x in row['scales'])}" if scope == "model"
                             else f", skew scale {row['scale']:.3g}"))


def headline(out, args) -> dict:
    """The stated realistic configuration: skew ``--headline-skew``, the largest world, moetrain
    dropless vs DeepSpeed drop_tokens=False (identical outputs), whole model when it ran."""
    lab = _skew_label(args.headline_skew)
    for scope in ("model", "layer"):
        tab = out["skew"][scope]
        ws = max((w for w in tab if lab in tab[w] and "dropless_vs_ds_nodrop" in tab[w][lab]["speedup"]),
                 key=int, default=None)
        if ws is None:
            continue
        row = tab[ws][lab]
        rs = row["routing_per_layer"] if scope == "model" else [row["routing"]]
        sp = row["speedup"]["dropless_vs_ds_nodrop"]
        loads = ", ".join(f"{r['expert_max_mean']:.2f}" for r in rs)
        return {"config": f"{scope}, {lab} (measured expert load max/mean {loads}), world {ws}: moetrain dropless "
                          f"vs DeepSpeed drop_tokens=False",
                "speedup_vs_deepspeed": sp["paired"], "speedup_median": sp["median"], "speedup_best": sp["best"],
                "target": 1.3, "target_met": sp["paired"] >= 1.3}
    return {"config": None, "speedup_vs_deepspeed": None, "target": 1.3, "target_met": False}


def _speed_table(title, table: dict, variants) -> None:
    print(title)
    print(f"{'world':>5} {'variant':<12} {'med ms':>8} {'best ms':>8} {'tokens/s':>9} "
          f"{'x ds_cap (median / paired / best)':>34}")
    for ws, lay in table.items():
        t = {n: lay[n]["times_s"] for n in variants if n in lay}
        for n in variants:
            if n not in lay:
                continue
            r = lay[n]
            sp = _ratios(t, n, "ds_cap") if "ds_cap" in t else None
            sps = f"{sp['median']:.2f} / {sp['paired']:.2f} / {sp['best']:.2f}" if sp else "-"
            print(f"{ws:>5} {n:<12} {r['median_s']*1e3:>8.1f} {r['min_s']*1e3:>8.1f} {r['tokens_per_s']:>9.0f} {sps:>34}")


def print_table(out, args) -> None:
    print()
    _speed_table("== 1. MoE layer alone: train step (fwd+bwd+AdamW), tokens/s over all ranks ==", out["layer"],
                 ("mt_cap", "mt_dropless", "ds_cap", "ds_nodrop"))
    for ws, lay in out["layer"].items():
        if "maxdiff_mt_dropless_vs_ds_nodrop" in lay:
            print(f"  world {ws}: same routing & weights, |mt_dropless - ds_nodrop| max = "
                  f"{lay['maxdiff_mt_dropless_vs_ds_nodrop']:.1e}; dropped pairs on rank 0: {lay['dropped_pairs_rank0']}")
        for n, pr in lay.get("profile_rank0", {}).items():
            print(f"  world {ws} profile {n:<12} (rank 0, ms self CPU) gemm {pr['gemm']:.0f}, comm+wait {pr['comm']:.0f}, "
                  f"other {pr['other']:.0f}, wall {pr['wall_ms']:.0f}; top other: "
                  + ", ".join(f"{k} {ms:.1f}" for k, ms, _ in pr["top_other"][:4]))
    print()
    _speed_table("== 2. Whole model (Transformer, every block MoE, LM loss, dense all-reduce, AdamW) ==", out["model"],
                 ("mt_cap", "mt_dropless", "ds_cap"))
    print()
    print("== 3. Expert compute: GroupedExperts fwd+bwd vs one SwiGLU matmul chain of the same FLOPs (1 thread) ==")
    for e in out["expert_efficiency"]:
        print(f"  world {e['world']}: {e['slots']} slots, {e['rows']} rows {e['rows_per_slot']}: grouped "
              f"{e['grouped_ms']:.1f} ms, raw {e['raw_ms']:.1f} ms (medians) -> efficiency {e['efficiency_median']*100:.0f}% "
              f"(paired {e['efficiency_paired']*100:.0f}%, best-of {e['efficiency_best']*100:.0f}%), "
              f"{e['grouped_gflops']:.1f} GFLOP/s")
    print()
    print("== 4. All-to-all off-rank traffic per step (all ranks), dedup vs not; dropless layer step time ==")
    print(f"{'world':>5} {'routing':<11} {'units dd':>9} {'units no':>9} {'MB/step dd':>11} {'MB/step no':>11} "
          f"{'bytes':>6} {'ms dd':>7} {'ms no':>7} {'time med/paired':>16}")
    for ws, dd in out["dedup"].items():
        for kind, r in dd.items():
            print(f"{ws:>5} {kind:<11} {r['dedup']['units_off_rank']:>9} {r['nodedup']['units_off_rank']:>9} "
                  f"{r['dedup']['bytes_step']/1e6:>11.2f} {r['nodedup']['bytes_step']/1e6:>11.2f} "
                  f"{r['bytes_ratio']:>6.2f} {r['dedup']['median_s']*1e3:>7.1f} {r['nodedup']['median_s']*1e3:>7.1f} "
                  f"{r['time_ratio']:>7.2f} / {r['time_ratio_paired']:.2f}")
    print("  bytes = dispatch payload (D+K fp32) + slot metadata (K int64) + combine (D fp32), forward and "
          "backward, off-rank rows only; ratios are dedup / no dedup")
    print(f"  random = top-{args.top_k} of uniform scores; correlated = {args.corr:.0%} of tokens pick an adjacent "
          "pair (2j, 2j+1) co-located by the contiguous placement")
    print()
    print(f"== 5. Memory (Transformer {args.layers} MoE layers, E={args.experts}, F={args.mem_ffn}, fp32) ==")
    for ws, m in out["memory"].items():
        print(f"  world {ws}: expert params/rank {m['expert_param_bytes_per_rank']/1e6:.1f} MB "
              f"(x{m.get('expert_bytes_ratio_vs_1', float('nan')):.2f} of world 1), dense {m['dense_param_bytes_per_rank']/1e6:.1f} MB, "
              f"peak RSS/rank {', '.join(f'{x:.0f}' for x in m['peak_rss_mb_per_rank'])} MB "
              f"(before model {m['rss_before_model_mb'][0]:.0f} MB)")
    for ws, r in out.get("rss", {}).items():
        print(f"  benchmark world {ws} (all variants alive): peak RSS/rank "
              f"{', '.join(f'{x:.0f}' for x in r['peak_rss_mb_per_rank'])} MB")
    if out["gpu"]:
        print()
        _speed_table("== GPU/NCCL: MoE layer alone (one GPU per rank) ==", out["gpu"],
                     ("mt_cap", "mt_dropless", "ds_cap", "ds_nodrop"))
    else:
        print("  GPU/NCCL: not run (CUDA not available here)")
    print()
    _skew_table(out, args)
    hl = out["headline"]
    if hl["config"]:
        print(f"  HEADLINE ({hl['config']}): speedup {hl['speedup_vs_deepspeed']:.2f}x paired "
              f"(median {hl['speedup_median']:.2f}x, best {hl['speedup_best']:.2f}x); >= 1.3x target "
              f"{'met' if hl['target_met'] else 'NOT met'}")
    print(f"  total {out['elapsed_s']:.0f} s")
    print()


if __name__ == "__main__":
    main()
