"""Can DeepSpeed's MoE parameter groups express moetrain's placements (any expert on any rank,
any replica count per expert)? Prints the expert-data-parallel groups DeepSpeed builds on 4 gloo
ranks, and the reduction sets a replicated moetrain placement needs.

    PYTHONPATH=. .venv/bin/python scripts/experiments/zero_moe_groups.py

DeepSpeed (deepspeed.utils.groups._create_expert_and_data_parallel) gives one group per
``ep_size``: rank r's expert tensor is reduced over the ranks ``{r mod ep_size + k * ep_size}``,
the same set for every expert the rank holds, and ``deepspeed.moe.layer.MoE`` puts exactly
``num_experts / ep_size`` experts on every rank. A placement where expert 0 has replicas on ranks
0 and 3 and expert 5 on rank 2 alone needs different reduction sets for rows of the same tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.helpers import run_gloo  # noqa: E402


def _groups(ctx) -> dict:
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    out = {}
    for ep in (1, 2, 4):
        groups._create_expert_and_data_parallel(ep)
        name = f"ep_size_{ep}"
        out[ep] = {"expert_parallel": groups._get_expert_parallel_group_ranks(name),
                   "expert_data_parallel": groups._get_expert_data_parallel_group_ranks(name)}
    return out


def needed_sets() -> dict[int, set[int]]:
    """Per logical expert of layer 0: the ranks holding it, in a replicated moetrain placement."""
    from placement.placement import Placement

    p = Placement.round_robin(1, 8, 4, 3)  # 12 slots for 8 experts: 4 experts get a second replica
    sets: dict[int, set[int]] = {}
    for r in range(4):
        for e in p.local_experts(0, r):
            sets.setdefault(int(e), set()).add(r)
    return sets


if __name__ == "__main__":
    got = run_gloo(_groups, 4)
    for ep in (1, 2, 4):
        print(f"ep_size {ep}: expert-data-parallel reduction set per rank:",
              {r: sorted(g[ep]["expert_data_parallel"]) for r, g in enumerate(got)})
    sets = needed_sets()
    print("moetrain round-robin placement, 8 experts on 4 ranks x 3 slots; ranks holding each expert:",
          {e: sorted(s) for e, s in sorted(sets.items())})
    ds_sets = [{frozenset(g[ep]["expert_data_parallel"]) for g in got} for ep in (1, 2, 4)]
    need = {frozenset(s) for s in sets.values()}
    print("needed reduction sets expressible by one DeepSpeed ep_size:",
          [need <= d for d in ds_sets], "(ep_size 1, 2, 4)")
