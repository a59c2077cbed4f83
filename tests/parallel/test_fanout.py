"""The fan-out and unit-sum autograd Functions against the indexing expressions they replace
(values and gradients) and a hand-computed case."""

import pytest
import torch

from moetrain.parallel.fanout import fan_out_rows, weighted_unit_sums


def test_fan_out_by_hand():
    # 2 units, D = 2, K = 2: unit 0 = [1, 2 | w 0.5, 0], unit 1 = [3, 4 | w 0, 0.25]
    recv = torch.tensor([[1.0, 2.0, 0.5, 0.0], [3.0, 4.0, 0.0, 0.25]], requires_grad=True)
    x, w = fan_out_rows(recv, torch.tensor([1, 0, 1]), torch.tensor([1, 0, 1]), 2)
    assert x.tolist() == [[3.0, 4.0], [1.0, 2.0], [3.0, 4.0]] and w.tolist() == [0.25, 0.5, 0.25]
    (x.sum() + 10 * w.sum()).backward()
    # unit 1 is read twice (rows and weight k=1), unit 0 once
    assert recv.grad.tolist() == [[1.0, 1.0, 10.0, 0.0], [2.0, 2.0, 0.0, 20.0]]


def test_unit_sums_by_hand():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    w = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    out = weighted_unit_sums(y, w, torch.tensor([1, 0, 1]), 3)
    assert out.tolist() == [[6.0, 8.0], [5.5, 7.0], [0.0, 0.0]]
    out.backward(torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]))
    assert y.grad.tolist() == [[0.0, 0.5], [2.0, 0.0], [0.0, 1.0]]
    assert w.grad.tolist() == [2.0, 3.0, 6.0]  # <grad row of its unit, y row>


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_match_the_indexing_expressions(dtype, tol):
    g = torch.Generator().manual_seed(0)
    V, D, K, N = 7, 5, 3, 11
    recv = torch.randn(V, D + K, generator=g).to(dtype)
    unit = torch.randint(0, V, (N,), generator=g)
    k = torch.randint(0, K, (N,), generator=g)
    y = torch.randn(N, D, generator=g).to(dtype)
    gout = torch.randn(V, D, generator=g).to(dtype)
    grads = []
    for lean in (True, False):
        r, yy = recv.clone().requires_grad_(True), y.clone().requires_grad_(True)
        if lean:
            x, w = fan_out_rows(r, unit, k, D)
            out = weighted_unit_sums(x * yy, w, unit, V)
        else:
            x, w = r[:, :D].index_select(0, unit), r[unit, D + k]
            out = torch.zeros(V, D, dtype=dtype).index_add(0, unit, x * yy * w.unsqueeze(1))
        out.backward(gout)
        grads.append((out.detach().float(), r.grad.float(), yy.grad.float()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=tol, rtol=tol)
