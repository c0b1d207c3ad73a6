"""Timing of training steps for the throughput benches: data time and step time apart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any


def time_steps(batches: Iterator[Any], step: Callable[[Any], int], steps: int, warmup: int = 5
               ) -> tuple[float, float, float]:
    """Run warmup + steps of step(next(batches)) (which returns the batch's image count).

    Returns (images/s, data ms per batch, step ms per batch) over the timed steps.
    """
    data_s = step_s = 0.0
    n = 0
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        k = step(batch)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s, step_s, n = data_s + t1 - t0, step_s + t2 - t1, n + k
    return n / (data_s + step_s), 1e3 * data_s / steps, 1e3 * step_s / steps
