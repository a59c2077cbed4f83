"""Study 2: the whole moetrain ``Transformer`` (every block MoE; LM loss, dense-gradient
all-reduce, AdamW step) vs the same Transformer, same weights, whose MoE FFNs are DeepSpeed
``MoE`` layers, for every skew in ``--model-skews`` x (dropless / DeepSpeed no-drop, moetrain /
DeepSpeed at every ``--model-cfs``), all interleaved.

Skew: router row e of layer l gets s_l*z_l[e]*u_l, u_l the unit direction of the mean MoE input
of layer l (over all ranks' tokens: the component every token shares, so this acts as a
per-expert bias); s_l is calibrated layer by layer on the real MoE inputs so each layer's expert
load max/mean hits the target (a layer whose unskewed load already exceeds it keeps s_l = 0).
The embeddings are untouched."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .adapter import attach_dispatchers, dense_and_scaled_grad_sync, moetrain_grad_sync
from .common import (RankEnv, forward_region, gemm_ref_step, interleaved, legacy_names, median, model_cfg, model_tokens,
                     ratios, summ, train_step_fn)
from .profiling import profile_step
from .skew import all_counts, calibrate, skew_label, skew_summary, skew_vectors

TOKEN_SEED = 3000  # + rank: this rank's token batch


@dataclass(frozen=True)
class ModelSetup:
    """One rank's whole-model inputs: the contiguous placement of every MoE layer and the token
    batch (inputs ``x`` and next-token targets ``y``, [B, seq])."""

    env: RankEnv
    placement: object
    x: torch.Tensor
    y: torch.Tensor

    def build(self, capacity_factor: float, spec: dict | None = None):
        """A Transformer (same weights for every capacity factor) with all-to-all dispatchers
        and, given a skew ``spec``, its skewed gates."""
        from moetrain.model import Transformer
        env = self.env
        m = Transformer(model_cfg(env.args, capacity_factor), seed=0, placement=self.placement,
                        rank=env.rank).to(env.device)
        attach_dispatchers(m.moe_layers(), self.placement, env.ctx, capacity_factor, dedup=True)
        if spec is not None:
            self.apply_spec(m, spec)
        return m

    def apply_spec(self, m, spec: dict) -> None:
        a, device = self.env.args, self.env.device
        with torch.no_grad():
            for i, layer in enumerate(m.moe_layers()):
                if spec["scales"][i]:
                    z_E = skew_vectors(a.dim, a.experts, i)[1].to(device)
                    u_l = torch.tensor(spec["u"][i], dtype=torch.float32, device=device)
                    layer.router.gate_ED.add_(spec["scales"][i] * torch.outer(z_E, u_l))

    def layer_counts(self, m) -> list:
        """[L] of [W, E] routing counts of one no-grad forward."""
        with torch.no_grad():
            _, routes = m(self.x)
        return [all_counts(torch.bincount(r.topk_ids_TK.flatten(), minlength=self.env.args.experts), self.env.ws)
                for r in routes]


def model_setup(env: RankEnv) -> ModelSetup:
    from placement.placement import Placement
    a = env.args
    L = model_cfg(a, 0.0).n_layers  # every block is MoE (every_n_layers=1)
    placement = Placement.contiguous(L, a.experts, env.ws)
    B = max(1, a.tokens // a.seq)
    g = torch.Generator().manual_seed(TOKEN_SEED + env.rank)
    tok = torch.randint(0, a.vocab, (B, a.seq + 1), generator=g).to(env.device)
    return ModelSetup(env, placement, tok[:, :-1], tok[:, 1:])


def _moe_input(probe, layer, x) -> torch.Tensor:
    """Layer ``layer``'s input [N, D] in a no-grad forward of ``probe`` on ``x``."""
    captured = {}
    h = layer.register_forward_pre_hook(lambda mod, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        probe(x)
    h.remove()
    return captured["x"].reshape(-1, layer.router.gate_ED.shape[1]).float()


def _calibrated_spec(s: ModelSetup, probe, target: float) -> dict:
    """Skew scales and directions, layer by layer, each on the inputs the skewed layers before
    it produce; ``probe``'s gates are left skewed."""
    env, a = s.env, s.env.args
    E, K, D = a.experts, a.top_k, a.dim
    layers = probe.moe_layers()
    spec = {"scales": [0.0] * len(layers), "u": [None] * len(layers)}
    if target <= 0:
        return spec
    for i, layer in enumerate(layers):
        x_TD = _moe_input(probe, layer, s.x)
        mean_D = x_TD.sum(0)  # the component every token shares, over all ranks' tokens
        dist.all_reduce(mean_D)
        u_l = mean_D / mean_D.norm()
        spec["u"][i] = u_l.cpu().tolist()
        g0_ED = layer.router.gate_ED.detach().clone()
        z_E = skew_vectors(D, E, i)[1].to(env.device)

        def counts_of(scale, x_TD=x_TD, g0_ED=g0_ED, z_E=z_E, u_l=u_l):
            ids = F.linear(x_TD, g0_ED + scale * torch.outer(z_E, u_l)).topk(K, dim=-1).indices
            return torch.bincount(ids.flatten(), minlength=E)
        spec["scales"][i] = calibrate(counts_of, target, env.ws, E)[0]
        with torch.no_grad():
            layer.router.gate_ED.copy_(g0_ED + spec["scales"][i] * torch.outer(z_E, u_l))
    return spec


def _variant(s: ModelSetup, capacity_factor: float, is_ds: bool, spec: dict):
    """(model, its training step) of one variant; DeepSpeed variants swap every block's MoE FFN
    for a DeepSpeed MoE with the same weights."""
    from moetrain import losses
    env = s.env
    m = s.build(capacity_factor, spec)
    if is_ds:
        from .ds_baseline import ds_variant, make_adapter_cls
        adapter_cls = make_adapter_cls()
        for blk in m.blocks:
            blk.ffn = adapter_cls(ds_variant(env.args, env.ws, capacity_factor, blk.ffn, env.device)).to(env.device)
        sync = dense_and_scaled_grad_sync(list(m.parameters()), env.ctx, env.ws)
    else:
        sync = moetrain_grad_sync(m, s.placement, env.ctx)

    def fl(m=m):
        with forward_region(env.args, env.device):  # the trainer's forward: autocast in bf16, then fp32 loss
            logits, _ = m(s.x)
        return losses.lm_loss(logits, s.y)
    return m, train_step_fn(fl, list(m.parameters()), sync, env.args.adamw)


def model_study(env: RankEnv) -> dict:
    """This rank's ``{"times": {skew/variant: [s]}, "skews": {skew: calibration, counts, checks}}``."""
    s = model_setup(env)
    a = env.args
    steps, info = {}, {}
    for sk in a.model_skew_list:
        lab = skew_label(sk)
        probe = s.build(0.0)
        spec = _calibrated_spec(s, probe, sk)
        info[lab] = {"target": sk, "spec": {"scales": spec["scales"]},
                     "counts_LRE": [c.tolist() for c in s.layer_counts(probe)]}
        del probe
        variants = [("mt_dropless", 0.0, False)] + ([("ds_nodrop", 0.0, True)] if env.ds_ok else [])
        for c in a.model_cf_list:
            variants += [(f"mt_cf{c:g}", c, False)] + ([(f"ds_cf{c:g}", c, True)] if env.ds_ok else [])
        built = {}
        for name, c, is_ds in variants:
            built[name], steps[f"{lab}/{name}"] = _variant(s, c, is_ds, spec)
        if env.ds_ok:  # same routing in every layer: dropless moetrain == DeepSpeed no-drop (logits)
            with torch.no_grad(), forward_region(a, env.device):
                diff = built["mt_dropless"](s.x)[0].float() - built["ds_nodrop"](s.x)[0].float()
                info[lab]["maxdiff_logits_mt_dropless_vs_ds_nodrop"] = float(diff.abs().max())
    steps["gemm_ref"], gemm_flops = gemm_ref_step(env)
    grid = {"times": interleaved(steps, 1, a.model_iters, env.barrier), "skews": info, "gemm_ref_flops": gemm_flops}
    legacy = legacy_names(a.capacity_factor)
    out = {"model_grid": grid, "model_times": {k: grid["times"][v] for k, v in legacy.items() if v in grid["times"]}}
    if a.profile:  # every rank runs the profiled steps; rank 0 reports
        prof = {k: profile_step(steps[v]) for k, v in legacy.items() if v in steps}
        if env.rank == 0:
            out["model_profile"] = prof
    return out


def summarize_model(r0: dict, args, ws: int) -> tuple[dict, dict]:
    """Section 2's JSON (legacy view: balanced, ``--capacity-factor``) and the model skew table
    for one world size, from rank 0's results."""
    mt = r0["model_times"]
    tokens = model_tokens(args, ws)
    mod = {n: summ(v, tokens) for n, v in mt.items()}
    if "ds_cap" in mt:
        mod["speedup"] = {"mt_cap_vs_ds_cap": ratios(mt, "mt_cap", "ds_cap"),
                          "mt_dropless_vs_ds_cap": ratios(mt, "mt_dropless", "ds_cap")}
        if "ds_nodrop" in mt:
            mod["speedup"]["mt_dropless_vs_ds_nodrop"] = ratios(mt, "mt_dropless", "ds_nodrop")
    if "model_profile" in r0:
        mod["profile_rank0"] = r0["model_profile"]
    mod["flops_share_of_gemm"] = flops_share(r0["model_grid"], args)
    return mod, skew_summary(r0["model_grid"], args, ws, tokens, model=True)


def flops_share(grid: dict, args) -> dict:
    """Useful FLOP rate of the balanced dropless whole-model step over the GEMM reference's rate
    (in the pass's precision: bf16 model steps against bf16 matmuls), per round (both timed in
    the same round, the slowest rank's time each), median over rounds."""
    t_model = grid["times"][legacy_names(args.capacity_factor)["mt_dropless"]]
    t_gemm = grid["times"]["gemm_ref"]
    flops, gflops = model_train_flops(args), grid["gemm_ref_flops"]
    shares = [(flops / tm) / (gflops / tg) for tm, tg in zip(t_model, t_gemm)]
    return {"share_paired": median(shares), "shares": shares, "rounds": len(shares),
            "model_gflops_per_rank": flops / median(t_model) / 1e9, "gemm_gflops_per_rank": gflops / median(t_gemm) / 1e9,
            "train_flops_per_step_rank": flops}


def model_train_flops(args) -> float:
    """Useful FLOPs of one rank's training step (forward + backward = 3x forward, 2 FLOPs per
    multiply-add) of the benchmark Transformer: per token and layer, the QKV and output
    projections (4 D^2), causal attention scores and values (2 * D * (seq + 1) / 2), the router
    (D E) and K SwiGLU experts (3 D F each); plus the LM head (D V). Norms, softmax, rotary and
    elementwise ops are not counted; dropped or padded rows are not useful."""
    D, S = args.dim, args.seq
    tokens = max(1, args.tokens // S) * S
    per_layer = 4 * D * D + D * (S + 1) + D * args.experts + args.top_k * 3 * D * args.ffn
    return 3 * 2 * tokens * (args.layers * per_layer + D * args.vocab)
