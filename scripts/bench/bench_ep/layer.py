"""Study 1: one MoE layer's training step (router + dispatch + experts + combine, forward +
backward + AdamW) on every rank, for every routing skew x (dropless | capacity factors), moetrain
``MoELayer`` + ``AllToAllDispatcher`` against ``deepspeed.moe.layer.MoE`` with the same gate,
SwiGLU expert weights, top-k and capacity factor, all variants interleaved.

Skew s: x = x0 + c*u (u a fixed unit vector, c = ``--skew-c`` * typical |x0|), gate row e gets
b_e*u with b = scale * z (z a fixed random profile over experts); the scale is calibrated so the
measured global expert load max/mean hits the target. moetrain and DeepSpeed get the same x and
gate, so dropless moetrain == DeepSpeed without dropping (checked, ``maxdiff_*``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter import attach_dispatchers
from .common import (RankEnv, forward_region, interleaved, legacy_names, median, moe_cfg, ratios, summ,
                     train_step_fn)
from .profiling import profile_step
from .skew import calibrate, skew_label, skew_vectors

GATE_SEED = 7  # the random gate shared by every rank
INPUT_SEED = 1000  # + rank: this rank's inputs and regression targets
INIT_STD = 0.02  # expert weight init


@dataclass(frozen=True)
class LayerSetup:
    """One rank's inputs of the layer studies (1 and 4): the contiguous one-layer placement,
    this rank's experts, the base gate [E, D], inputs and targets [T, D]."""

    env: RankEnv
    placement: object
    local: list
    gate0_ED: torch.Tensor
    x_TD: torch.Tensor
    tgt_TD: torch.Tensor

    def build_layer(self, capacity_factor: float, dedup: bool = True, gate_ED=None, chunks: int = 1, clock=None):
        """A moetrain MoE layer with this rank's experts, the given gate (default: the base
        gate) and an all-to-all dispatcher (``chunks``, ``clock``: see ``attach_dispatchers``)."""
        from moetrain.model.moe.layer import MoELayer
        env, D = self.env, self.env.args.dim
        layer = MoELayer(D, moe_cfg(env.args, capacity_factor, dedup), layer_index=0, seed=0,
                         local_experts=self.local, init_std=INIT_STD).to(env.device)
        with torch.no_grad():  # the gate is zeros by construction: same random gate on every rank
            layer.router.gate_ED.copy_(self.gate0_ED if gate_ED is None else gate_ED)
        attach_dispatchers([layer], self.placement, env.ctx, capacity_factor, dedup, chunks, clock)
        return layer


def layer_setup(env: RankEnv) -> LayerSetup:
    from placement.placement import Placement
    a = env.args
    D, E, T = a.dim, a.experts, a.tokens
    placement = Placement.contiguous(1, E, env.ws)
    gate0_ED = torch.randn(E, D, generator=torch.Generator().manual_seed(GATE_SEED)) * a.gate_std
    g = torch.Generator().manual_seed(INPUT_SEED + env.rank)
    x_TD = torch.randn(T, D, generator=g).to(env.device)
    tgt_TD = torch.randn(T, D, generator=g).to(env.device)
    return LayerSetup(env, placement, placement.local_experts(0, env.rank).tolist(), gate0_ED, x_TD, tgt_TD)


def _skewed(s: LayerSetup, target: float):
    """This skew's inputs [T, D] and ``gate_of(scale)`` -> gate [E, D]."""
    a, device = s.env.args, s.env.device
    u_D, z_E = skew_vectors(a.dim, a.experts, 0)
    x_TD = s.x_TD
    xs_TD = x_TD + (a.skew_c * float(x_TD.norm(dim=1).mean())) * u_D.to(device) if target > 0 else x_TD
    # the base gate's own component along u would bias the experts by itself: project it out
    g0 = s.gate0_ED
    g_perp_ED = g0 - torch.outer(g0 @ u_D, u_D) if target > 0 else g0

    def gate_of(scale):
        return g_perp_ED + scale * torch.outer(z_E, u_D)
    return xs_TD, gate_of


def _mse_step(module, xs_TD, tgt_TD, args, on_route=None):
    """Train step of ``module`` on a regression to ``tgt_TD`` (forward in the pass's precision,
    loss in fp32); ``on_route(route)`` sees the second output (moetrain's RouterOutput)."""
    xin = xs_TD.clone().requires_grad_(True)

    def fl():
        with forward_region(args, xin.device):
            y, route, *_ = module(xin.unsqueeze(0))
        if on_route is not None:
            on_route(route)
        return (y.squeeze(0).float() - tgt_TD).pow(2).mean()
    return train_step_fn(fl, list(module.parameters()), adamw=args.adamw)


def _add_variants(s: LayerSetup, lab: str, xs_TD, gate_ED, grid: dict, steps: dict, layers: dict) -> None:
    """moetrain dropless and at every ``--cfs``, each with its DeepSpeed counterpart."""
    from .ds_baseline import ds_variant
    env = s.env
    for cf_name, c in [("dropless", 0.0)] + [(f"cf{c:g}", c) for c in env.args.cf_list]:
        layer = s.build_layer(c, gate_ED=gate_ED)
        name = f"{lab}/mt_{cf_name}"
        layers[name] = layer

        def on_route(route, lab=lab, cf_name=cf_name):
            grid[lab]["dropped"][f"mt_{cf_name}"] = route.num_dropped
        steps[name] = _mse_step(layer, xs_TD, s.tgt_TD, env.args, on_route)
        if not env.ds_ok:
            continue
        dname = f"{lab}/ds_{'nodrop' if c == 0 else cf_name}"
        layers[dname] = ds_variant(env.args, env.ws, c, layer, env.device)
        steps[dname] = _mse_step(layers[dname], xs_TD, s.tgt_TD, env.args)


def _clocked(step, clock, seconds: list):
    """``step`` that appends the seconds ``clock`` counted during it to ``seconds``."""
    def run():
        clock.reset()
        step()
        seconds.append(clock.blocked_s)
    return run


def _add_overlap_variants(s: LayerSetup, lab: str, xs_TD, gate_ED, grid: dict, steps: dict, layers: dict) -> dict:
    """Balanced routing, dropless: the unchunked layer and the ``--chunks`` pipelined one, each
    with a ``CommClock``; replaces the plain dropless step by its clocked twin (same layer)."""
    from moetrain.parallel.a2a import CommClock
    a = s.env.args
    blocked = {"unchunked": [], "chunked": []}
    for kind, chunks in (("unchunked", 1), ("chunked", a.chunks)):
        clock = CommClock()
        name = f"{lab}/mt_dropless" if chunks == 1 else f"{lab}/mt_dropless_c{chunks}"
        layers[name] = s.build_layer(0.0, gate_ED=gate_ED, chunks=chunks, clock=clock)
        def on_route(route, key=name.split("/", 1)[1]):
            grid[lab]["dropped"][key] = route.num_dropped
        steps[name] = _clocked(_mse_step(layers[name], xs_TD, s.tgt_TD, a, on_route), clock, blocked[kind])
    return blocked


def _overlap_result(blocked: dict, warmup: int, chunks: int) -> dict:
    """Per-step seconds blocked in token all-to-alls (after warm-up) of both variants."""
    return {"chunks": chunks, "blocked_s_unchunked": blocked["unchunked"][warmup:],
            "exposed_s_chunked": blocked["chunked"][warmup:]}


def _check_same_outputs(s: LayerSetup, lab: str, xs_TD, grid: dict, layers: dict) -> None:
    """Same routing, same weights: dropless moetrain == DeepSpeed no-drop; at a capacity factor
    both keep the same count per expert (which pairs are kept may differ). In the pass's
    precision (under bf16 the two differ by bf16 rounding, and near-ties may route apart)."""
    with torch.no_grad(), forward_region(s.env.args, xs_TD.device):
        y_mt = layers[f"{lab}/mt_dropless"](xs_TD.unsqueeze(0))[0]
        y_ds = layers[f"{lab}/ds_nodrop"](xs_TD.unsqueeze(0))[0]
        grid[lab]["maxdiff_mt_dropless_vs_ds_nodrop"] = float((y_mt.float() - y_ds.float()).abs().max())
        for c in s.env.args.cf_list:
            y_mt = layers[f"{lab}/mt_cf{c:g}"](xs_TD.unsqueeze(0))[0]
            y_ds = layers[f"{lab}/ds_cf{c:g}"](xs_TD.unsqueeze(0))[0]
            grid[lab][f"maxdiff_cf{c:g}"] = float((y_mt.float() - y_ds.float()).abs().max())


def _legacy_view(res: dict, t: dict, grid: dict, cf: float) -> None:
    """Section 1's original figures: balanced routing, ``--capacity-factor``."""
    bal = skew_label(0.0)
    legacy = legacy_names(cf)
    res["layer_times"] = {k: t[v] for k, v in legacy.items() if v in t}
    res["layer_dropped"] = {k: grid[bal]["dropped"].get(v.split("/")[1]) for k, v in legacy.items()
                            if k.startswith("mt")} if bal in grid else {}
    if bal in grid and "maxdiff_mt_dropless_vs_ds_nodrop" in grid[bal]:
        res["layer_maxdiff_dropless_vs_ds_nodrop"] = grid[bal]["maxdiff_mt_dropless_vs_ds_nodrop"]


def layer_study(s: LayerSetup) -> dict:
    """This rank's layer figures: ``layer_grid`` (times per skew/variant, calibrated skews,
    counts, dropped pairs, output checks), the legacy ``layer_*`` view and, with ``--profile``,
    ``profile`` (rank 0; every rank runs the profiled steps)."""
    env, a = s.env, s.env.args
    E, K = a.experts, a.top_k
    steps, layers, grid = {}, {}, {}
    for sk in a.skew_list:
        lab = skew_label(sk)
        xs_TD, gate_of = _skewed(s, sk)

        def counts_of(scale, xs_TD=xs_TD, gate_of=gate_of):
            ids = F.linear(xs_TD.float(), gate_of(scale).to(env.device)).topk(K, dim=-1).indices
            return torch.bincount(ids.flatten(), minlength=E)
        scale, counts_RE = calibrate(counts_of, sk, env.ws, E)
        grid[lab] = {"target": sk, "scale": scale, "counts_RE": counts_RE.tolist(), "dropped": {}}
        _add_variants(s, lab, xs_TD, gate_of(scale), grid, steps, layers)
        if sk == 0 and a.chunks > 1 and env.ws > 1:
            blocked = _add_overlap_variants(s, lab, xs_TD, gate_of(scale), grid, steps, layers)
        if env.ds_ok:
            _check_same_outputs(s, lab, xs_TD, grid, layers)
    t = interleaved(steps, a.warmup, a.iters, env.barrier)
    res = {"layer_grid": {"times": t, "skews": grid}}
    _legacy_view(res, t, grid, a.capacity_factor)
    legacy = {**legacy_names(a.capacity_factor), "mt_chunked": f"{skew_label(0.0)}/mt_dropless_c{a.chunks}"}
    legacy_steps = {k: steps[v] for k, v in legacy.items() if v in steps}
    if legacy["mt_chunked"] in t:
        res["layer_times"]["mt_chunked"] = t[legacy["mt_chunked"]]
        res["overlap"] = _overlap_result(blocked, a.warmup, a.chunks)
    if a.profile:
        prof = {n: profile_step(step) for n, step in legacy_steps.items()}
        if env.rank == 0:
            res["profile"] = prof
    return res


def summarize_layer(r0: dict, ws: int, tokens: int) -> dict:
    """Section 1's JSON for one world size from rank 0's results: per legacy variant timings,
    dropped pairs, the dropless == no-drop check and the speedups over DeepSpeed."""
    lt = r0["layer_times"]
    lay = {n: summ(v, tokens) for n, v in lt.items()}
    lay["dropped_pairs_rank0"] = r0["layer_dropped"]
    if "layer_maxdiff_dropless_vs_ds_nodrop" in r0:
        lay["maxdiff_mt_dropless_vs_ds_nodrop"] = r0["layer_maxdiff_dropless_vs_ds_nodrop"]
        lay["ds_init_s"] = r0.get("ds_init_s")
    lay["speedup"] = {}
    if "ds_cap" in lt:
        lay["speedup"] = {"mt_cap_vs_ds_cap": ratios(lt, "mt_cap", "ds_cap"),
                          "mt_dropless_vs_ds_cap": ratios(lt, "mt_dropless", "ds_cap"),
                          "mt_dropless_vs_ds_nodrop": ratios(lt, "mt_dropless", "ds_nodrop")}
        if "mt_chunked" in lt:
            lay["speedup"]["mt_chunked_vs_ds_nodrop"] = ratios(lt, "mt_chunked", "ds_nodrop")
    if "mt_chunked" in lt:
        lay["speedup"]["mt_chunked_vs_mt_dropless"] = ratios(lt, "mt_chunked", "mt_dropless")
    if "profile" in r0:
        lay["profile_rank0"] = r0["profile"]
    return lay


def summarize_overlap(res: dict, ws: int) -> dict | None:
    """How much of the token all-to-all time the chunked pipeline hides, from every rank.

    ``hidden_share`` = 1 - E / B, where B = sum over ranks of the median (over timed rounds) of
    the seconds per training step the rank spends inside the blocking token all-to-alls of the
    unchunked dropless layer (payload + slot metadata + combine, forward and backward; the
    count exchange excluded), and E = the same sum for the chunked layer of the seconds spent
    issuing and waiting for its asynchronous all-to-alls (``CommClock``). Both layers run
    interleaved in the same rounds on the same inputs. Time blocked includes waiting for a
    slower rank, in both. 0 = nothing hidden, 1 = the transfers never made the rank wait."""
    per_rank = [res[r]["overlap"] for r in range(ws) if "overlap" in res[r]]
    if not per_rank:
        return None
    blocked = [median(o["blocked_s_unchunked"]) for o in per_rank]
    exposed = [median(o["exposed_s_chunked"]) for o in per_rank]
    return {"chunks": per_rank[0]["chunks"], "rounds": len(per_rank[0]["blocked_s_unchunked"]),
            "blocked_ms_unchunked_per_rank": [round(b * 1e3, 2) for b in blocked],
            "exposed_ms_chunked_per_rank": [round(e * 1e3, 2) for e in exposed],
            "hidden_share": 1.0 - sum(exposed) / sum(blocked) if sum(blocked) > 0 else float("nan")}
