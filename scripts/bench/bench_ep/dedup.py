"""Study 4: all-to-all bytes per step with and without dedup, counted from the dispatcher's
``send_splits`` (off-rank units only), and the measured dropless layer step time of each, for a
*random* routing (top-k of uniform random scores) and a *correlated* one (with probability
``--corr`` a token picks an adjacent expert pair (2j, 2j+1), which the contiguous placement puts
on one rank; else two random experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import interleaved, median, ratios, train_step_fn

ROUTING_KINDS = ("random", "correlated")
ROUTING_SEED = 2000  # + rank: this rank's fixed routing
FP32_BYTES, INT64_BYTES = 4, 8


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


def _sent_units(layer, x_TD, rank: int) -> dict:
    """Units this rank's dispatch sends / receives (off-rank and total), from its splits."""
    with torch.no_grad():
        r = layer.router(x_TD)
        _, meta = layer.dispatcher.dispatch(x_TD, r.topk_ids_TK, r.topk_weights_TK)
    return {"units_off_rank": sum(meta.send_splits) - meta.send_splits[rank],
            "units_total": sum(meta.send_splits),
            "units_recv_off_rank": sum(meta.recv_splits) - meta.recv_splits[rank]}


def dedup_study(s) -> dict:
    """This rank's ``{kind: {"sent": {dedup|nodedup: units}, "times": {dedup|nodedup: [s]}}}``
    (``s``: a layer.LayerSetup)."""
    env, a = s.env, s.env.args
    out = {}
    for kind in ROUTING_KINDS:
        gk = torch.Generator().manual_seed(ROUTING_SEED + env.rank)
        ids = routing_ids(kind, a.tokens, a.experts, a.top_k, a.corr, gk).to(env.device)
        dsteps, sent = {}, {}
        for dedup in (True, False):
            layer = s.build_layer(0.0, dedup)
            layer.router = FixedRouter(layer.router, ids)
            name = "dedup" if dedup else "nodedup"
            sent[name] = _sent_units(layer, s.x_TD, env.rank)
            xin = s.x_TD.clone().requires_grad_(True)

            def fl(layer=layer, xin=xin):
                y, _ = layer(xin.unsqueeze(0))
                return (y.squeeze(0) - s.tgt_TD).pow(2).mean()
            dsteps[name] = train_step_fn(fl, list(layer.parameters()), adamw=s.env.args.adamw)
        out[kind] = {"sent": sent, "times": interleaved(dsteps, 1, max(3, a.iters // 2), env.barrier)}
    return out


def _traffic(units: int, ws: int, D: int, K: int) -> dict:
    """Bytes per step over all ranks for ``units`` off-rank units: dispatch payload (D + K floats)
    + slot metadata (K int64) + splits (R int64) forward; the same payload back in backward (grad
    of dispatch); combine rows (D floats) forward and their grads backward."""
    splits = ws * (ws - 1) * INT64_BYTES
    payload = units * (D + K) * FP32_BYTES
    meta = units * K * INT64_BYTES
    combine = units * D * FP32_BYTES
    return {"units_off_rank": units, "x_row_bytes": units * D * FP32_BYTES,
            "bytes_fwd": payload + meta + splits + combine,
            "bytes_step": 2 * (payload + combine) + meta + splits}


def summarize_dedup(res: dict, ws: int, D: int, K: int) -> dict:
    """Section 4's JSON for one world size from every rank's results."""
    dd = {}
    for kind, v in res[0]["dedup"].items():
        row = {"routing": kind}
        for name in ("dedup", "nodedup"):
            units = sum(res[r]["dedup"][kind]["sent"][name]["units_off_rank"] for r in range(ws))
            row[name] = {**_traffic(units, ws, D, K), "median_s": median(v["times"][name])}
        row["bytes_ratio"] = row["dedup"]["bytes_step"] / max(1, row["nodedup"]["bytes_step"])
        row["time_ratio"] = row["dedup"]["median_s"] / row["nodedup"]["median_s"]
        row["time_ratio_paired"] = 1.0 / ratios(v["times"], "dedup", "nodedup")["paired"]
        dd[kind] = row
    return dd
