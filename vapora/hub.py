"""The hub: subscribers grouped by workflow id, and the fan-out of each change.

The store calls `publish` after each commit, in seq order. Publishing never
waits: each subscriber takes the change synchronously and decides for itself
whether to send it now or to fall back to the latest state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Protocol

from .frames import Encoded, Outgoing, heartbeat
from .model import utc_now
from .stats import Stats
from .store import Change

logger = logging.getLogger(__name__)


class Subscriber(Protocol):
    """A socket (or stream) watching one workflow, or all of them if id is None."""

    workflow_id: str | None

    def deliver(self, out: Outgoing) -> None:
        """Take one change without blocking; never raise."""

    def heartbeat(self, beat: Encoded) -> None:
        """Take the shared heartbeat frame without blocking; never raise."""

    async def close(self, code: int, reason: str) -> None:
        """Close the underlying connection with a close code."""


class Hub:
    """Fans committed changes out to the subscribers of each workflow."""

    def __init__(self, stats: Stats | None = None) -> None:
        self.stats = stats or Stats()
        # Identifies the database; set when the store opens.
        self.epoch = ""
        self._groups: dict[str, set[Subscriber]] = {}
        self._everything: set[Subscriber] = set()

    def subscribe(self, sub: Subscriber) -> None:
        if sub.workflow_id is None:
            self._everything.add(sub)
        else:
            self._groups.setdefault(sub.workflow_id, set()).add(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub.workflow_id is None:
            self._everything.discard(sub)
            return
        group = self._groups.get(sub.workflow_id)
        if group is None:
            return
        group.discard(sub)
        if not group:
            del self._groups[sub.workflow_id]

    def publish(self, change: Change) -> None:
        """Hand a committed change to its workflow's subscribers and list watchers."""
        group = self._groups.get(change.workflow_id)
        if not group and not self._everything:
            return
        out = Outgoing(change, self.epoch)
        targets = (*(group or ()), *self._everything)
        for sub in targets:
            self._deliver(sub, out)
        self.stats.frames_sent += len(targets)
        self.stats.publish_seconds.observe(time.monotonic() - change.committed_at)

    def _deliver(self, sub: Subscriber, out: Outgoing) -> None:
        try:
            sub.deliver(out)
        except Exception:
            logger.exception("Dropping a subscriber of %s that failed", sub.workflow_id)
            self.unsubscribe(sub)

    def beat(self) -> None:
        """Send every subscriber a heartbeat, so clients can tell a dead link."""
        beat = heartbeat(utc_now())
        for group in (*self._groups.values(), self._everything):
            for sub in tuple(group):
                try:
                    sub.heartbeat(beat)
                except Exception:
                    logger.exception("Dropping a subscriber that failed a heartbeat")
                    self.unsubscribe(sub)

    async def run_heartbeats(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.beat()

    def subscribers(self, workflow_id: str | None = None) -> int:
        """Count subscribers: of one workflow, or in all."""
        if workflow_id is not None:
            return len(self._groups.get(workflow_id, ()))
        return sum(len(g) for g in self._groups.values()) + len(self._everything)

    def count_by_transport(self) -> Counter[str]:
        """Count subscribers by transport, for metrics; walks every subscriber."""
        counts: Counter[str] = Counter()
        for group in (*self._groups.values(), self._everything):
            for sub in group:
                counts[getattr(sub, "transport_name", "other")] += 1
        return counts

    def watched_workflows(self) -> int:
        return len(self._groups)

    async def close_all(self, code: int, reason: str) -> None:
        """Close every subscriber, as the server shuts down."""
        subs = [s for g in self._groups.values() for s in g] + list(self._everything)
        await asyncio.gather(
            *(s.close(code, reason) for s in subs), return_exceptions=True
        )
