"""Tests for moetrain.analysis.specialisation on hand-made routing assignments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moetrain.analysis.specialisation import (domain_counts, js_divergence, layer_report, load_imbalance,
                                              mean_pairwise_jsd, pairwise_jsd, routing_distribution,
                                              topk_share)

E, K = 4, 2


def specialised() -> tuple[np.ndarray, np.ndarray]:
    """Domain 0 always picks experts {0, 1}, domain 1 always {2, 3}: 3 tokens each."""
    ids_TK = np.array([[0, 1], [1, 0], [0, 1], [2, 3], [3, 2], [2, 3]])
    return ids_TK, np.array([0, 0, 0, 1, 1, 1])


def uniform() -> tuple[np.ndarray, np.ndarray]:
    """Both domains spread over all 4 experts evenly (each expert once per domain per 2 tokens)."""
    ids_TK = np.array([[0, 1], [2, 3], [3, 0], [1, 2]])
    return ids_TK, np.array([0, 0, 1, 1])


def mixed() -> tuple[np.ndarray, np.ndarray]:
    """Domain 0 (4 tokens): counts [4, 2, 1, 1] -> P = [1/2, 1/4, 1/8, 1/8].
    Domain 1 (2 tokens): counts [1, 1, 1, 1] -> P = [1/4] * 4."""
    ids_TK = np.array([[0, 1], [0, 1], [0, 2], [0, 3], [0, 1], [2, 3]])
    return ids_TK, np.array([0, 0, 0, 0, 1, 1])


def test_fully_specialised_case():
    ids, dom = specialised()
    counts = domain_counts(ids, dom, 2, E)
    assert counts.tolist() == [[3, 3, 0, 0], [0, 0, 3, 3]]
    P = routing_distribution(counts)
    np.testing.assert_array_equal(P, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(topk_share(P, K), [1.0, 1.0])  # all selections on its k experts
    assert js_divergence(P[0], P[1]) == pytest.approx(1.0, abs=1e-15)  # disjoint supports: 1 bit
    assert js_divergence(P[0], P[1], base=math.e) == pytest.approx(math.log(2), abs=1e-15)
    assert load_imbalance(counts.sum(0)) == 1.0  # specialised yet globally balanced


def test_uniform_case():
    ids, dom = uniform()
    P = routing_distribution(domain_counts(ids, dom, 2, E))
    np.testing.assert_array_equal(P, np.full((2, E), 0.25))
    np.testing.assert_array_equal(topk_share(P, K), [K / E, K / E])
    assert js_divergence(P[0], P[1]) == 0.0
    assert mean_pairwise_jsd(P) == 0.0
    assert load_imbalance(np.full(E, 7)) == 1.0


def test_mixed_case_by_hand():
    ids, dom = mixed()
    counts = domain_counts(ids, dom, 2, E)
    assert counts.tolist() == [[4, 2, 1, 1], [1, 1, 1, 1]]
    P = routing_distribution(counts)
    np.testing.assert_allclose(P, [[0.5, 0.25, 0.125, 0.125], [0.25] * 4])
    np.testing.assert_allclose(topk_share(P, 2), [0.75, 0.5])
    np.testing.assert_allclose(topk_share(P, 1), [0.5, 0.25])
    # m = [3/8, 1/4, 3/16, 3/16]; KL(p0||m) = KL(p1||m) = 1/2 log2(4/3) + 1/4 log2(2/3)
    by_hand = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3)
    assert js_divergence(P[0], P[1]) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(0.0612781, abs=1e-7)
    # load: [5, 3, 2, 2], mean 3 -> 5/3
    assert load_imbalance(counts.sum(0)) == pytest.approx(5 / 3, rel=1e-12)


def test_layer_report_collects_everything():
    ids, dom = mixed()
    rep = layer_report(ids, dom, ["code", "english"], E, K)
    assert rep["tokens"] == {"code": 4, "english": 2}
    assert rep["topk_share"] == pytest.approx({"code": 0.75, "english": 0.5})
    assert rep["jsd_bits"] == pytest.approx(rep["jsd_pairs"]["code|english"])
    assert rep["load_imbalance"] == pytest.approx(5 / 3)
    np.testing.assert_allclose(rep["P_DE"], [[0.5, 0.25, 0.125, 0.125], [0.25] * 4])


def test_pairwise_jsd_three_domains():
    P = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0.5, 0.5, 0, 0]])
    J = pairwise_jsd(P)
    np.testing.assert_allclose(J, [[0, 1, 0], [1, 0, 1], [0, 1, 0]], atol=1e-15)
    assert mean_pairwise_jsd(P) == pytest.approx(2 / 3)
    assert math.isnan(mean_pairwise_jsd(P[:1]))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="topk_ids_TK has ids"):
        domain_counts(np.array([[0, 4]]), np.array([0]), 1, 4)
    with pytest.raises(ValueError, match="domain_T has labels"):
        domain_counts(np.array([[0, 1]]), np.array([2]), 2, 4)
    with pytest.raises(ValueError, match="domain_T must have shape"):
        domain_counts(np.array([[0, 1]]), np.array([0, 0]), 1, 4)
    with pytest.raises(ValueError, match=r"domain\(s\) \[1\] have no routed tokens"):
        routing_distribution(np.array([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"k \(5\) must be in \[1, E=4\]"):
        topk_share(np.full((1, 4), 0.25), 5)
