"""Plain counters the server keeps about itself; metrics.py exports them.

The hot paths only add to integers here, once per change rather than once per
socket; turning them into Prometheus text happens at scrape time.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class Histogram:
    """Counts of observations at or below each bucket's upper bound, and their sum."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Return (upper bound, cumulative count) pairs, ending with +Inf."""
        running, out = 0, []
        for bound, count in zip(
            (*map(str, self.bounds), "+Inf"), self.counts, strict=True
        ):
            running += count
            out.append((bound, running))
        return out


@dataclass
class Stats:
    frames_sent: int = 0
    updates_collapsed: int = 0
    slow_clients_closed: int = 0
    resumes: Counter[str] = field(default_factory=Counter)
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    publish_seconds: Histogram = field(default_factory=Histogram)
    store_write_seconds: Histogram = field(default_factory=Histogram)
    gc_pause_seconds: Histogram = field(default_factory=Histogram)
    gc_pause_max_seconds: float = 0.0
