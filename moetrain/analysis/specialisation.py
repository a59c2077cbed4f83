"""Expert specialisation by domain: how differently the tokens of each domain are routed.

Owns: pure numpy functions from one MoE layer's routing decisions (``topk_ids_TK``) and a domain
label per token to the read-outs used by the global-batch LBL experiment
(``scripts/experiments/global_lbl.py``, "Demons in the Detail", Qwen 2025):

- ``counts_DE[d, e]``  number of (token, slot) selections of expert ``e`` by tokens of domain ``d``;
- ``P_DE[d, e]``       = counts_DE[d, e] / sum_e' counts_DE[d, e']   (a domain's routing distribution);
- top-k share          = sum of the k largest entries of ``P_DE[d]``  (k/E uniform .. 1 specialised);
- Jensen-Shannon divergence between two domains' distributions, in **bits** (base 2) by default,
  so 0 when identical and exactly 1 when their supports are disjoint (ln 2 nats);
- load imbalance       = max_e load_E / mean_e load_E  (1 balanced .. E when one expert takes all).

Shapes: T tokens, K experts per token, E experts, D domains.
"""

from __future__ import annotations

import numpy as np


def domain_counts(topk_ids_TK: np.ndarray, domain_T: np.ndarray, num_domains: int, num_experts: int) -> np.ndarray:
    """Selections per domain and expert::

        counts_DE[d, e] = #{(t, j) : domain_T[t] = d and topk_ids_TK[t, j] = e}

    topk_ids_TK: int [T, K] expert ids in [0, E); domain_T: int [T] in [0, D).
    Returns int64 [D, E]; each row sums to K x (tokens of that domain).
    """
    ids_TK = np.asarray(topk_ids_TK)
    dom_T = np.asarray(domain_T)
    if ids_TK.ndim != 2:
        raise ValueError(f"topk_ids_TK must be 2-D [T, K], got shape {ids_TK.shape}")
    if dom_T.shape != (ids_TK.shape[0],):
        raise ValueError(f"domain_T must have shape ({ids_TK.shape[0]},) to match topk_ids_TK, got {dom_T.shape}")
    if ids_TK.size and (ids_TK.min() < 0 or ids_TK.max() >= num_experts):
        raise ValueError(
            f"topk_ids_TK has ids in [{ids_TK.min()}, {ids_TK.max()}], outside [0, num_experts={num_experts})"
        )
    if dom_T.size and (dom_T.min() < 0 or dom_T.max() >= num_domains):
        raise ValueError(
            f"domain_T has labels in [{dom_T.min()}, {dom_T.max()}], outside [0, num_domains={num_domains})"
        )
    K = ids_TK.shape[1]
    flat = np.repeat(dom_T.astype(np.int64), K) * num_experts + ids_TK.astype(np.int64).reshape(-1)
    return np.bincount(flat, minlength=num_domains * num_experts).reshape(num_domains, num_experts)


def routing_distribution(counts_DE: np.ndarray) -> np.ndarray:
    """Each domain's routing distribution over experts::

        P_DE[d, e] = counts_DE[d, e] / sum_e' counts_DE[d, e']

    counts_DE: [D, E] non-negative. Returns float64 [D, E], rows summing to 1.
    Raises ValueError if a domain has no selections (its distribution is undefined).
    """
    counts = np.asarray(counts_DE, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"counts_DE must be 2-D [D, E], got shape {counts.shape}")
    totals_D = counts.sum(axis=1)
    empty = np.flatnonzero(totals_D <= 0)
    if empty.size:
        raise ValueError(f"domain(s) {empty.tolist()} have no routed tokens: routing distribution undefined")
    return counts / totals_D[:, None]


def topk_share(P_DE: np.ndarray, k: int) -> np.ndarray:
    """Share of each domain's selections that go to its k most-used experts::

        share[d] = sum of the k largest P_DE[d, e] over e

    With top-k routing (k distinct experts per token) this is 1.0 exactly when a domain always
    uses the same k experts (fully specialised) and k / E when it spreads uniformly.
    P_DE: [D, E] rows summing to 1; 1 <= k <= E. Returns float64 [D].
    """
    P = np.asarray(P_DE, dtype=np.float64)
    E = P.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"k ({k}) must be in [1, E={E}]")
    return np.sort(P, axis=-1)[..., E - k :].sum(axis=-1)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum_i p_i log(p_i / q_i) in nats, with 0 log 0 = 0 (q_i > 0 wherever p_i > 0)."""
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def js_divergence(p_E: np.ndarray, q_E: np.ndarray, *, base: float = 2.0) -> float:
    """Jensen-Shannon divergence of two distributions over experts::

        JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),   m = (p + q) / 2,   logs in ``base``

    Symmetric, 0 iff p = q, at most log_base(2): **1 bit** with the default base 2 (ln 2 = 0.693
    nats with ``base=math.e``), reached when p and q have disjoint supports.
    p_E, q_E: [E], non-negative; each is normalised to sum 1 first. Returns a float.
    """
    p = np.asarray(p_E, dtype=np.float64)
    q = np.asarray(q_E, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"p_E and q_E must be 1-D of the same length, got {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("p_E and q_E must be non-negative with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    return (0.5 * _kl(p, m) + 0.5 * _kl(q, m)) / np.log(base)


def pairwise_jsd(P_DE: np.ndarray, *, base: float = 2.0) -> np.ndarray:
    """JSD_DD[a, b] = js_divergence(P_DE[a], P_DE[b]); symmetric, zero diagonal. float64 [D, D]."""
    P = np.asarray(P_DE, dtype=np.float64)
    D = P.shape[0]
    out = np.zeros((D, D))
    for a in range(D):
        for b in range(a + 1, D):
            out[a, b] = out[b, a] = js_divergence(P[a], P[b], base=base)
    return out


def mean_pairwise_jsd(P_DE: np.ndarray, *, base: float = 2.0) -> float:
    """Mean of JSD over the D(D-1)/2 unordered pairs of domains (NaN when D < 2)."""
    D = np.asarray(P_DE).shape[0]
    if D < 2:
        return float("nan")
    iu = np.triu_indices(D, k=1)
    return float(pairwise_jsd(P_DE, base=base)[iu].mean())


def load_imbalance(load_E: np.ndarray) -> float:
    """max_e load_E / mean_e load_E: 1.0 perfectly balanced, E when one expert gets everything.

    load_E: [E] selections per expert (e.g. ``counts_DE.sum(0)``), not all zero."""
    load = np.asarray(load_E, dtype=np.float64)
    if load.ndim != 1 or load.sum() <= 0:
        raise ValueError(f"load_E must be 1-D with a positive sum, got shape {load.shape}, sum {load.sum()}")
    return float(load.max() / load.mean())


def layer_report(
    topk_ids_TK: np.ndarray, domain_T: np.ndarray, domains: list[str] | tuple[str, ...], num_experts: int, k: int
) -> dict:
    """Every read-out of one layer, JSON-able.

    Returns ``{"P_DE": [D][E] list, "topk_share": {domain: float}, "jsd_bits": mean pairwise JSD
    (base 2), "jsd_pairs": {"a|b": float}, "load_imbalance": max/mean over all tokens,
    "tokens": {domain: int}}``. The load is over the tokens given, so it reflects their domain mix.
    """
    D = len(domains)
    counts_DE = domain_counts(topk_ids_TK, domain_T, D, num_experts)
    P_DE = routing_distribution(counts_DE)
    share_D = topk_share(P_DE, k)
    jsd_DD = pairwise_jsd(P_DE)
    K = np.asarray(topk_ids_TK).shape[1]
    return {
        "P_DE": P_DE.tolist(),
        "topk_share": {name: float(s) for name, s in zip(domains, share_D)},
        "jsd_bits": mean_pairwise_jsd(P_DE),
        "jsd_pairs": {f"{domains[a]}|{domains[b]}": float(jsd_DD[a, b]) for a in range(D) for b in range(a + 1, D)},
        "load_imbalance": load_imbalance(counts_DE.sum(axis=0)),
        "tokens": {name: int(c) // K for name, c in zip(domains, counts_DE.sum(axis=1))},
    }
