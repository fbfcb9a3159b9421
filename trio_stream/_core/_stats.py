"""Cheap counters for hot paths: a histogram that takes many observations at once."""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

import attrs

__all__ = ["LAG_BUCKETS", "LATENCY_BUCKETS", "RATIO_BUCKETS", "Histogram"]

LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
LAG_BUCKETS: Final = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
RATIO_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@attrs.define(eq=False)
class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense, without locks or labels.

    ``observe(value, count)`` records *count* observations of *value* in one step, so a
    batch of events costs one call.
    """

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field(init=False)
    sum: float = 0.0
    count: int = 0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float, count: int = 1) -> None:
        """Record *count* observations of *value*."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count
        self.count += count

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or below it)`` pairs, ending with ``+Inf``."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
