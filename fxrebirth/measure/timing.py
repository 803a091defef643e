"""Benchmark helpers: latency of several variants measured side by side in one process.

This machine is noisy and has two cores, so variants are never timed one after another in blocks: every
round runs each variant once, in a freshly shuffled order, and the result is the median per variant.
Compare ratios measured in one call, not absolute times from different calls.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

__all__ = ["interleaved_medians", "interleaved_times", "ratio_spread"]


def interleaved_times(runs: dict[str, Callable[[], object]], rounds: int, seed: int = 0,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of each run in every round, the runs taken in a shuffled order every round (no variant
    always runs right after another one: measured, position alone moved one by 15%). Round ``i`` of every
    run was measured at about the same time, so per-round ratios cancel slow drifts of the machine."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for key in order:
            start = time.perf_counter()
            runs[key]()
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, seed: int = 0,
                        warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each run of :func:`interleaved_times`."""
    return {k: statistics.median(v) for k, v in interleaved_times(runs, rounds, seed, warmup).items()}


def ratio_spread(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range (25th, 75th percentiles) of the per-round ratios
    ``numerator[i] / denominator[i]`` of two runs timed in the same rounds."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3
