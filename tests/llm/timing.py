"""Timing of CPU-bound work for the linear-time tests: ratios, never absolute thresholds."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable


def best_time(work: Callable[[str], object], text: str, runs: int = 5) -> float:
    """The fastest of ``runs`` calls of ``work(text)``, in seconds, with the garbage
    collector paused (a collection of the whole test process must not count)."""
    best = math.inf
    gc.disable()
    try:
        for _ in range(runs):
            started = time.perf_counter()
            work(text)
            best = min(best, time.perf_counter() - started)
    finally:
        gc.enable()
    return best
