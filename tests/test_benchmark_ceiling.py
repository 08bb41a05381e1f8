"""The benchmarks' same-maths ceiling counts the CPU kernels the goals run (attention, oneDNN linears)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd3_lora_celeba.models.cpu_linear import onednn_available, use_onednn_linears


@pytest.fixture(scope="module")
def ceiling(load_benchmark):
    return load_benchmark("ceiling")


def test_cpu_attention_is_counted_forward_and_backward(ceiling):
    b, h, s, d = 1, 2, 48, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    product = 2 * b * h * s * s * d  # one (s x d) @ (d x s) per head
    assert ceiling.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * product
    # backward: four products (the scores kept, not recomputed)
    assert (
        ceiling.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 6 * product
    )


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_onednn_linears_are_counted_like_nn_linear(ceiling):
    stock, fast = torch.nn.Linear(32, 24), torch.nn.Linear(32, 24)
    use_onednn_linears(fast)
    x = torch.randn(3, 5, 32, requires_grad=True)
    counts = [ceiling.count_flops(lambda m=m: m(x).sum().backward()) for m in (stock, fast)]
    assert counts[0] == counts[1] == 3 * 2 * 15 * 32 * 24  # forward, input gradient, weight gradient


def test_ceiling_row_states_the_bound(ceiling):
    row = ceiling.ceiling_row(plain_seconds=4.0, flops=100e9, rate=50e9)
    assert row[1] == pytest.approx(2.0)
    assert "100 GFLOP per step" in row[0] and "50 GFLOP/s" in row[0] and "at most 2.00x" in row[0]
    assert "plain runs at 50% of it" in row[0]
    assert ceiling.matmul_rate(torch.device("cpu"), repeats=1, sizes=(256,)) > 1e8
