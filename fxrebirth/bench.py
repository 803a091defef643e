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

__all__ = ["interleaved_medians"]


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, seed: int = 0,
                        warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each run, the runs taken in a shuffled order every round (no variant always
    runs right after another one: measured, position alone moved one by 15%)."""
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
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
