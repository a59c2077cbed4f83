"""Run a function on every rank of a fresh gloo group of spawned CPU processes (one torch thread
each, as a Ray actor of the default run) and collect what each rank returns.

Peak memory of a rank: the kernel's high-water mark of its resident set (``VmHWM``), reset with
``/proc/self/clear_refs`` (5 = reset the peak) once the process has imported everything and loaded
the data, minus the resident set at that moment. That is what the operating system charges the
training step itself, allocator slack included; torch keeps no CPU allocator statistics.
"""

from __future__ import annotations

from scripts.helpers import proc_status_kib, run_gloo

RANK_TIMEOUT_S = 900


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in KiB; raises where there is none."""
    kib = proc_status_kib(key)
    if kib is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return kib


def reset_peak_rss() -> int:
    """Reset the peak resident set to the current one; returns the current resident bytes."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return status_kib("VmHWM") * 1024


def run_ranks(fn, world: int, *args) -> list:
    """``fn(ctx, *args)`` on ``world`` spawned ranks (``scripts.helpers.run_gloo``, 900 s per rank
    and per collective); results in rank order (raises on any error)."""
    return run_gloo(fn, world, *args, timeout_s=RANK_TIMEOUT_S)
