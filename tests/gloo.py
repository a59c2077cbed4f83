"""Run a function on every rank of a real multi-process gloo group, for unit tests of code that
calls collectives (gradient reduction, global load-balancing counts).

``run_gloo(fn, world_size, *args)`` spawns ``world_size`` processes, joins them into a gloo
group on 127.0.0.1, calls ``fn(ctx, *args)`` on each (``ctx`` a
:class:`~moetrain.parallel.context.ParallelContext`) and returns the results in rank order.
``fn`` must be a module-level function (spawn pickles it by name) and return picklable values.
A rank that raises makes the call fail with that rank's traceback. The one definition is
``scripts.helpers.run_gloo``; the tests wait 120 s per rank and 30 s per collective.
"""

from __future__ import annotations

from scripts.helpers import run_gloo as _run_gloo

TIMEOUT_S = 120


def run_gloo(fn, world_size: int, *args) -> list:
    return _run_gloo(fn, world_size, *args, timeout_s=TIMEOUT_S, pg_timeout_s=TIMEOUT_S // 4)
