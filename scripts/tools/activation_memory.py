"""Activation bytes one micro-batch keeps for backward, per precision x checkpointing mode
(``moetrain.train.activation_memory.model_activation_bytes``, one process, all experts local).

Usage: ``python -m scripts.tools.activation_memory [--config X] [--batch B] [--set key=value ...]``
(the shipped tiny config by default, B = its micro-batch per rank); prints a
table, then one JSON line with ``activation_checkpointing_memory_ratio`` (block / none, bf16).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def measure(overrides: list[str], batch: int | None = None, config: str | None = None) -> dict:
    from moetrain.config import load_config
    from moetrain.model import Transformer
    from moetrain.train.activation_memory import model_activation_bytes

    cfg = load_config(config, overrides)
    model_cfg = cfg.model if cfg.model.vocab_size else cfg.model.__class__(
        **{**cfg.model.__dict__, "vocab_size": cfg.data.vocab_size})
    B = batch or cfg.micro_batch_size
    tokens = torch.randint(0, model_cfg.vocab_size, (B, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    out = {"batch": B, "seq_len": cfg.data.seq_len}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for mode in ("none", "attention", "block"):
            model = Transformer(model_cfg, seed=0)
            model.apply_activation_checkpointing(mode)
            out[f"{precision}/{mode}"] = model_activation_bytes(model, tokens, dtype=dtype)
    out["activation_checkpointing_memory_ratio"] = out["bf16/block"] / out["bf16/none"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="a config YAML (default: the shipped tiny)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    res = measure(args.overrides, args.batch, args.config)
    for k, v in res.items():
        print(f"{k:40s} {v / 2**20:.2f} MiB" if "/" in k else f"{k:40s} {v}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
