"""Garbage collection with many sockets open: short pauses, and their timing.

Each open socket is a few dozen long-lived objects, and a full collection walks
them all: at 20,000 sockets that stalls the server for about a second. So, once a
second, what is alive is frozen (`gc.freeze`) and later collections walk only what
is newer. A closed socket is freed by reference counting, except for a few objects
in a cycle inside asyncio's transport (about 1 kB), which stay frozen. Once the
sockets closed since the last thaw outnumber the open ones THAW_RATIO times,
everything is thawed and collected once: a long pause, but rare, and cheap when
few sockets are left.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from .hub import Hub
from .stats import Stats

logger = logging.getLogger(__name__)

THAW_RATIO = 4
# Below this many open sockets, a full collection is short anyway.
FEW_SOCKETS = 1000


class PauseTimer:
    """Times every collection into the stats, through gc.callbacks."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.stats.gc_pause_seconds.observe(pause)
        self.stats.gc_pause_max_seconds = max(self.stats.gc_pause_max_seconds, pause)

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


async def freeze_long_lived(hub: Hub, interval_s: float) -> None:
    """Every interval_s, freeze what is alive; thaw after many sockets closed."""
    left_at_thaw = hub.left
    while True:
        await asyncio.sleep(interval_s)
        open_now = max(hub.subscribers(), FEW_SOCKETS)
        if hub.left - left_at_thaw > THAW_RATIO * open_now:
            started = time.perf_counter()
            gc.unfreeze()
            freed = gc.collect()
            logger.info(
                "Collected %d objects left by %d closed sockets in %.0f ms",
                freed,
                hub.left - left_at_thaw,
                (time.perf_counter() - started) * 1000,
            )
            left_at_thaw = hub.left
        # Young garbage is collected first, so that only live objects are frozen.
        gc.collect(1)
        gc.freeze()
