"""The most any implementation of the same maths could gain on this machine, measured rather than guessed.

A speed-up goal compares two implementations of the same computation in the same dtype. When both already run
their matrix products near the machine's matmul rate, the only way to go faster is to do fewer FLOPs, so the
ratio a goal can reach is bounded by::

    ceiling = plain seconds / (FLOPs of ours / the fastest fp32 matmul rate measured here)

``ceiling_row`` turns that into one table row: the fastest possible seconds in the median column and the bound in
the label. The bound is generous: it counts only matrix products and convolutions (layer norms, activations and
copies are free in it), puts them all at the best rate of large square matmuls, and counts attention's backward
without recomputing the scores (four products, not the five of the fused kernels).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.utils import flop_counter

MATMUL_SIZES = (1024, 2048, 3072)


def _register_cpu_kernels() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU ones, nor the oneDNN linear: count
    those the same way."""
    aten = torch.ops.aten
    forward, backward = (
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
    )
    if forward in flop_counter.flop_registry:
        return

    def forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        b, h, s_q, d = query
        recompute = flop_counter.bmm_flop((b * h, s_q, d), (b * h, d, key[2]))  # the scores, kept instead
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value) - recompute

    flop_counter.register_flop_formula(forward)(forward_flops)
    flop_counter.register_flop_formula(backward)(backward_flops)
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the oneDNN linears of models/cpu_linear.py

        def onednn_linear_flops(x, weight, *args, out_shape=None, **kwargs) -> int:
            return 2 * weight[0] * weight[1] * (math.prod(x) // x[-1])

        flop_counter.register_flop_formula(torch.ops.mkldnn._linear_pointwise)(onednn_linear_flops)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention, CPU kernels included)."""
    _register_cpu_kernels()
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_rate(
    device: torch.device, cpu_time: bool = False, repeats: int = 3, sizes: tuple[int, ...] = MATMUL_SIZES
) -> float:
    """The best fp32 matmul rate measured here, FLOP/s, of the BLAS and (on a CPU) of oneDNN: of wall time, or of
    this process's CPU time (all threads) with ``cpu_time``."""
    from sd3_lora_celeba.models.cpu_linear import onednn_available, onednn_linear

    clock = time.process_time if cpu_time else time.perf_counter
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        products = [torch.mm]
        if device.type == "cpu" and onednn_available():
            products.append(lambda x, y: onednn_linear(x, y, None))
        for product in products:
            product(a, b)  # warm-up
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = clock()
                product(a, b)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = max(best, 2 * n**3 / max(clock() - start, 1e-9))
    return best


def ceiling_row(plain_seconds: float, flops: float, rate: float, unit: str = "step") -> list:
    """A goal-table row: the fastest a same-maths implementation could be here, and the ratio that allows."""
    floor = flops / rate
    return [
        f"same-maths ceiling: {flops / 1e9:.0f} GFLOP per {unit} at the measured {rate / 1e9:.0f} GFLOP/s "
        f"fp32 matmul rate; plain runs at {100 * floor / plain_seconds:.0f}% of it, so at most "
        f"{plain_seconds / floor:.2f}x",
        floor,
        None,
        None,
    ]
