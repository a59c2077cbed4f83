"""Live re-placement (filled in with the placement solver)."""

from __future__ import annotations


def due(cfg, step: int) -> bool:
    p = cfg.placement
    return p.replan_every > 0 and step % p.replan_every == 0 and step < cfg.train.steps
