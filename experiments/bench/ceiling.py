"""Part 1, the hardware ceiling: dense float32 matrix products with torch, on one thread and on every core.

A product of two n × n matrices is 2n³ floating-point operations. Each measurement runs enough products to last
`min_time_s` and reports the median
over repeats. The best size per thread count is the ceiling the device phase's FLOP/s is compared with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import psutil
import torch

from bench.common import median_time, torch_threads


def matmul_flops(n: int, threads: int, repeats: int, min_time_s: float = 0.25) -> dict[str, Any]:
    """FLOP/s of `torch.mm` on n × n float32 matrices with `threads` torch threads (median over repeats)."""
    with torch_threads(threads):
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        torch.mm(a, b, out=out)  # starts the thread pool and warms the caches
        tic = time.perf_counter()
        torch.mm(a, b, out=out)
        calls = max(1, math.ceil(min_time_s / max(time.perf_counter() - tic, 1e-9)))

        def products() -> None:
            for _ in range(calls):
                torch.mm(a, b, out=out)

        seconds, all_seconds, _ = median_time(products, repeats)
    return {
        "n": n,
        "threads": threads,
        "products_per_repeat": calls,
        "flops": 2.0 * n**3 * calls / seconds,
        "seconds": all_seconds,
    }


def measure(sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    cores = psutil.cpu_count(logical=True) or 1
    thread_counts = sorted({1, cores})
    rows = [matmul_flops(n, threads, repeats) for threads in thread_counts for n in sizes]
    best = {threads: max(row["flops"] for row in rows if row["threads"] == threads) for threads in thread_counts}
    return {
        "method": "torch.mm, float32, n × n, 2n³ FLOP per product; median over repeats; ceiling = best size",
        "measurements": rows,
        "all_threads": cores,
        "ceiling_flops_one_thread": best[1],
        "ceiling_flops_all_threads": best[cores],
    }
