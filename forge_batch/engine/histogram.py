"""A streaming histogram for latencies: fixed log-spaced buckets, so quantiles over any number of values
take bounded memory and can be merged.

Bucket ``k`` holds values in ``[GROWTH**k, GROWTH**(k+1))`` with ``GROWTH = 1.02``; a quantile is reported
as its bucket's geometric middle, clamped to the exact minimum and maximum seen, so it is within 1% (relative)
of the exact nearest-rank quantile. Values from 1 µs to 1e6 s span at most ~1,400 buckets, whatever the count;
values at or below 1 µs (or negative: a clock step) count in one bucket reported as the minimum.
"""

from __future__ import annotations

import math
from typing import Any

GROWTH = 1.02
_INV_LOG_GROWTH = 1.0 / math.log(GROWTH)
MIN_VALUE = 1e-6
_UNDERFLOW = -(10**9)  # the bucket key of values <= MIN_VALUE
QUANTILES = (0.5, 0.9, 0.99)


class LogHistogram:
    """Counts of values by log-spaced bucket, plus the exact count, sum, min and max."""

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    @staticmethod
    def bucket_of(value: float) -> int:
        return _UNDERFLOW if value <= MIN_VALUE else math.floor(math.log(value) * _INV_LOG_GROWTH)

    def add(self, value: float) -> None:
        # called for every generated token: plain comparisons, no function calls beyond the log
        key = _UNDERFLOW if value <= MIN_VALUE else math.floor(math.log(value) * _INV_LOG_GROWTH)
        buckets = self.buckets
        buckets[key] = buckets.get(key, 0) + 1
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def merge(self, other: LogHistogram) -> None:
        for key, n in other.buckets.items():
            self.buckets[key] = self.buckets.get(key, 0) + n
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The nearest-rank ``q`` quantile (within 1%), or None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= rank:
                if key == _UNDERFLOW:
                    return self.min
                middle = GROWTH ** (key + 0.5)
                return min(max(middle, self.min), self.max)
        return self.max

    def to_dict(self) -> dict[str, Any]:
        """``count``, ``mean``, ``min``, ``max`` (exact) and ``p50`` / ``p90`` / ``p99`` (within 1%)."""
        if not self.count:
            return {"count": 0}
        out: dict[str, Any] = {"count": self.count, "mean": _round(self.total / self.count),
                               "min": _round(self.min), "max": _round(self.max)}
        for q in QUANTILES:
            out[f"p{round(q * 100)}"] = _round(self.quantile(q))
        return out


def _round(value: float | None) -> float | None:
    """Six significant digits: the quantiles carry 1% anyway, and summary.json stays readable."""
    return None if value is None else float(f"{value:.6g}")
