"""moetrain.analysis: pure-numpy read-outs of trained models (no torch, no ray).

- :mod:`moetrain.analysis.specialisation`: how domains route over experts — per-domain
  routing distribution, top-k share, Jensen-Shannon divergence between domains, load balance.
"""

from moetrain.analysis.specialisation import (
    domain_counts,
    js_divergence,
    layer_report,
    load_imbalance,
    mean_pairwise_jsd,
    pairwise_jsd,
    routing_distribution,
    topk_share,
)

__all__ = [
    "domain_counts",
    "js_divergence",
    "layer_report",
    "load_imbalance",
    "mean_pairwise_jsd",
    "pairwise_jsd",
    "routing_distribution",
    "topk_share",
]
