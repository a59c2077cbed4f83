"""The DeepSpeed-MoE peer of scripts/bench/bench_multinode.py: one rank process per netcluster node slot.

    python -m scripts.bench.netbench.ds_peer SPEC.json      # env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT

The same Transformer shape as the moetrain arms (every MoE FFN swapped for a
``deepspeed.moe.layer.MoE`` with the moetrain layer's gate and expert weights: DeepSpeed's flat
all-to-all, ``ep_size`` = world size, capacity factor ``SPEC.capacity_factor``), LM loss, dense
gradients averaged over ranks (gloo, as moetrain), AdamW. Ranks join over the nodes' addresses
(``GLOO_SOCKET_IFNAME`` set per node by netcluster). After ``warmup`` steps, ``steps`` steps are
timed between barriers; rank 0 reads the links' counters at both ends and writes SPEC.out.
Tokens are random ids (the peer's routing is its own random-init routing, not the trained one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def _args(spec: dict) -> argparse.Namespace:
    """The attribute set scripts/bench/bench_ep's model helpers read."""
    return argparse.Namespace(experts=spec["experts"], top_k=spec["top_k"], dim=spec["dim"], ffn=spec["expert_ffn"],
                              layers=spec["layers"], heads=spec["heads"], vocab=spec["vocab"], seq=spec["seq"],
                              tokens=spec["tokens_per_rank"], capacity_factor=spec["capacity_factor"],
                              precision="fp32", adamw="fused")


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(open((argv or sys.argv[1:])[0]).read())
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    from moetrain import losses
    from moetrain.model import Transformer
    from moetrain.parallel.context import init_distributed
    from placement.placement import Placement
    from scripts.bench.bench_ep.adapter import dense_and_scaled_grad_sync
    from scripts.bench.bench_ep.common import model_cfg, train_step_fn
    from scripts.bench.bench_ep.ds_baseline import ds_variant, init_deepspeed_comm, make_adapter_cls
    from scripts.bench.netbench.arm import read_links

    ctx = init_distributed(backend="gloo", master_addr=os.environ["MASTER_ADDR"],
                           master_port=int(os.environ["MASTER_PORT"]), rank=rank, world_size=ws, timeout_s=600)
    init_deepspeed_comm()
    a = _args(spec)
    # the moetrain arms' shape: olmoe-1b-7b-mini's untied embeddings and q/k norm
    cfg = dataclasses.replace(model_cfg(a, 0.0), tie_embeddings=False, qk_norm=True)
    placement = Placement.contiguous(cfg.n_layers, a.experts, ws)
    m = Transformer(cfg, seed=0, placement=placement, rank=rank)
    adapter = make_adapter_cls()
    for blk in m.blocks:
        if hasattr(blk.ffn, "router"):
            blk.ffn = adapter(ds_variant(a, ws, a.capacity_factor, blk.ffn, torch.device("cpu")))
    g = torch.Generator().manual_seed(3000 + rank)
    tok = torch.randint(0, a.vocab, (max(1, a.tokens // a.seq), a.seq + 1), generator=g)
    x, y = tok[:, :-1], tok[:, 1:]

    def forward_loss():
        logits, _ = m(x)
        return losses.lm_loss(logits, y)

    step = train_step_fn(forward_loss, list(m.parameters()), dense_and_scaled_grad_sync(list(m.parameters()), ctx, ws))
    for _ in range(spec["warmup"]):
        step()
    dist.barrier()
    links0 = read_links(spec["bridge_netns"], spec["links"]) if rank == 0 else None
    t0 = time.monotonic()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t)
    seconds = time.monotonic() - t0
    if rank == 0:
        links1 = read_links(spec["bridge_netns"], spec["links"])
        out = {"seconds": seconds, "steps": spec["steps"], "step_times": times,
               "links": {n: {k: links1[n][k] - links0[n][k] for k in ("sent", "received")} for n in links1}}
        with open(spec["out"], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
