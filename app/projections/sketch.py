"""Log-bucketed quantile sketch (DDSketch-style) kept as rows of bucket counts.

A positive value ``x`` is counted in bucket ``ceil(log(x) / log(GAMMA))`` with
``GAMMA = (1 + ALPHA) / (1 - ALPHA)``; the bucket's representative value
``2 * GAMMA**i / (GAMMA + 1)`` is within a relative error of ``ALPHA`` (1 %) of every value
the bucket holds, so every quantile read from the sketch is within 1 % of the exact sample
quantile (nearest rank: the ``ceil(q * n)``-th smallest sample, so a p99 of a few samples
is their largest). Values at or below
``MIN_VALUE`` share one zero bucket, read back as 0. Memory and storage grow with the number
of distinct buckets (about 230 per decade of range), never with the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

ALPHA = 0.01
GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
MIN_VALUE = 1e-6
ZERO_BUCKET = -(2**31)


def bucket_of(value: float) -> int:
    """The bucket index counting ``value``."""
    if value <= MIN_VALUE:
        return ZERO_BUCKET
    return math.ceil(math.log(value) / _LOG_GAMMA)


def value_of(bucket: int) -> float:
    """The representative value of ``bucket`` (within ``ALPHA`` of anything in it)."""
    if bucket == ZERO_BUCKET:
        return 0.0
    return 2 * GAMMA**bucket / (GAMMA + 1)


def quantiles(buckets: Iterable[tuple[int, int]], qs: Iterable[float]) -> list[float | None]:
    """Quantiles ``qs`` (0..1) of the samples counted in ``(bucket, count)`` pairs.

    Returns ``None`` for each quantile when there are no samples.
    """
    ordered = sorted((b, c) for b, c in buckets if c > 0)
    total = sum(c for _, c in ordered)
    if total == 0:
        return [None for _ in qs]
    results: list[float | None] = []
    for q in qs:
        rank = max(math.ceil(q * total) - 1, 0)  # nearest rank, 0-based
        seen = 0
        for bucket, count in ordered:
            seen += count
            if seen > rank:
                results.append(value_of(bucket))
                break
    return results
