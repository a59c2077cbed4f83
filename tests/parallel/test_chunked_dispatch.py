"""The pipelined (chunked, asynchronous) all-to-all path and the host-synchronisation budget.

On real gloo groups of 2 and 4 processes, ``AllToAllDispatcher.run`` with ``chunks`` > 1 must
equal one process holding every expert on the ranks' concatenated tokens: outputs, gradients of
the inputs and routing weights, and expert gradients (the backward pipelines too). With capacity
dropping it must equal the unchunked dispatcher (capacity is decided over all T tokens).
A whole MoE layer forward must synchronise with the host at most once (one ``.tolist()``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.gloo import run_gloo

T, D, F, E, K = 24, 16, 8, 8, 2
TOL = 1e-5
# aten ops whose result size or value needs the host to wait for the device
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero.", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
            "aten.masked_select")


def _inputs(rank: int):
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x, ids, w / w.sum(1, keepdim=True)


def _grads(experts, x, w, out):
    (out * torch.arange(1, D + 1)).sum().backward()
    g = {"out": out.detach(), "dx": x.grad, "dw": w.grad}
    for name in ("w_gate_SFD", "w_up_SFD", "w_down_SDF"):
        p = getattr(experts, name)
        g[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return g


def _ep_run(ctx, placement_json: str, chunks: int, dedup: bool, cf: float = 0.0):
    from moetrain.model.moe.experts import GroupedExperts
    from moetrain.parallel.dispatcher import AllToAllDispatcher
    from placement.placement import Placement
    placement = Placement.from_json(placement_json)
    experts = GroupedExperts(placement.local_experts(0, ctx.rank), D, F, seed=1, layer_index=0, init_std=0.1)
    x, ids, w = _inputs(ctx.rank)
    x.requires_grad_(True)
    w.requires_grad_(True)
    disp = AllToAllDispatcher(placement, 0, ctx, dedup=dedup, chunks=chunks, capacity_factor=cf)
    out, meta = disp.run(x, ids, w, experts)
    return _grads(experts, x, w, out), meta


def _chunked_vs_single_process(ctx, placement_json: str, chunks: int, dedup: bool) -> dict:
    from moetrain.model.moe.dispatcher import LocalDispatcher
    from moetrain.model.moe.experts import GroupedExperts
    from placement.placement import Placement
    mine, meta = _ep_run(ctx, placement_json, chunks, dedup)
    ref_experts = GroupedExperts(list(range(E)), D, F, seed=1, layer_index=0, init_std=0.1)
    xs, idss, ws = zip(*[_inputs(r) for r in range(ctx.world_size)])
    X, W = torch.cat(xs).requires_grad_(True), torch.cat(ws).requires_grad_(True)
    ref = LocalDispatcher(list(range(E)), E, 0.0)
    X_ND, rmeta = ref.dispatch(X, torch.cat(idss), W)
    theirs = _grads(ref_experts, X, W, ref.combine(ref_experts(X_ND, rmeta.tokens_per_slot), rmeta))
    sl = slice(ctx.rank * T, (ctx.rank + 1) * T)
    local = torch.as_tensor(Placement.from_json(placement_json).local_experts(0, ctx.rank), dtype=torch.long)
    errs = {k: float((mine[k] - theirs[k][sl]).abs().max()) for k in ("out", "dx", "dw")}
    for name in ("w_gate_SFD", "w_up_SFD", "w_down_SDF"):
        errs[name] = float((mine[name] - theirs[name][local]).abs().max()) if local.numel() else 0.0
    errs["num_chunks"] = meta.num_chunks
    return errs


def _placements(world: int):
    from placement.placement import Placement
    if world == 2:
        return Placement.contiguous(1, E, 2)
    return Placement.random(1, E, 4, seed=2, slots_per_rank=[3, 1, 0, 4])  # uneven; rank 2 gets nothing


@pytest.mark.slow
@pytest.mark.parametrize("world,chunks,dedup", [(2, 3, True), (4, 4, False), (4, 2, True)])
def test_chunked_run_matches_single_process(world, chunks, dedup):
    for rank, errs in enumerate(run_gloo(_chunked_vs_single_process, world, _placements(world).to_json(), chunks, dedup)):
        assert errs.pop("num_chunks") == chunks
        for key, err in errs.items():
            assert err < TOL, f"rank {rank} world {world} chunks {chunks} dedup {dedup}: {key} differs by {err:.2e}"


def _chunked_vs_unchunked_with_capacity(ctx, placement_json: str) -> dict:
    a, meta_a = _ep_run(ctx, placement_json, 3, True, cf=0.75)
    b, meta_b = _ep_run(ctx, placement_json, 1, True, cf=0.75)
    errs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    errs["dropped"] = (meta_a.num_dropped, meta_b.num_dropped)
    return errs


@pytest.mark.slow
def test_chunked_capacity_drops_what_the_unchunked_path_drops():
    for rank, errs in enumerate(run_gloo(_chunked_vs_unchunked_with_capacity, 2, _placements(2).to_json())):
        chunked, unchunked = errs.pop("dropped")
        assert chunked == unchunked > 0, f"rank {rank}: dropped {chunked} chunked vs {unchunked} unchunked"
        for key, err in errs.items():
            assert err < TOL, f"rank {rank}: {key} differs by {err:.2e}"


class _SyncCounter(TorchDispatchMode):
    """Counts aten ops that make the host wait for a value, and ``Tensor.tolist`` calls (which
    bypass the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if bool_index or any(name.startswith(op) for op in SYNC_OPS):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.syncs.append("Tensor.tolist")
            return counter._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _layer_forward_syncs(ctx, chunks: int, cf: float) -> list[str]:
    from moetrain.config import MoEConfig
    from moetrain.model.moe.layer import MoELayer
    from moetrain.parallel.dispatcher import AllToAllDispatcher
    from placement.placement import Placement
    placement = Placement.contiguous(1, E, ctx.world_size)
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=F, capacity_factor=cf), layer_index=0,
                     seed=0, local_experts=placement.local_experts(0, ctx.rank).tolist(), init_std=0.1)
    torch.nn.init.normal_(layer.router.gate_ED, std=0.5)
    layer.dispatcher = AllToAllDispatcher(placement, 0, ctx, capacity_factor=cf, chunks=chunks)
    x = _inputs(ctx.rank)[0].unsqueeze(0)
    layer(x)  # warm-up outside the counter
    with _SyncCounter() as counter:
        layer(x)
    return counter.syncs


@pytest.mark.slow
@pytest.mark.parametrize("chunks,cf", [(1, 0.0), (3, 1.0)])
def test_moe_layer_forward_synchronises_the_host_once(chunks, cf):
    for rank, syncs in enumerate(run_gloo(_layer_forward_syncs, 2, chunks, cf)):
        assert syncs == ["Tensor.tolist"], f"rank {rank} (chunks {chunks}, cf {cf}): host syncs {syncs}"
