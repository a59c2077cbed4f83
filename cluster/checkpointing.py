"""Checkpoint orchestration (filled in with moetrain.checkpoint)."""

from __future__ import annotations


def due(cfg, step: int) -> bool:
    c = cfg.checkpoint
    return bool(c.uri) and c.every > 0 and step % c.every == 0


def resolve_resume(cfg):
    return None


def latest_for_restart(cfg):
    return None
