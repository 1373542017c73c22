"""The hub: subscribers grouped by workflow id, and the fan-out of each change.

The store calls `publish` after each commit, in seq order. Publishing never
waits: each subscriber takes the change synchronously and decides for itself
whether to send it now or to fall back to the latest state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from .frames import Encoded, Outgoing, heartbeat, presence_frame
from .model import utc_now
from .stats import Stats
from .store import Change

logger = logging.getLogger(__name__)

# Subscribers given a heartbeat together; the slices of a sweep are spread out.
BEAT_SLICE = 100


class Subscriber(Protocol):
    """A socket (or stream) watching one workflow, or all of them if id is None."""

    workflow_id: str | None
    # The seq of the last change it holds; -1 until its opening frames are read.
    last_seq: int

    def deliver(self, out: Outgoing) -> None:
        """Take one change without blocking; never raise."""

    def notice(self, frame: Encoded) -> None:
        """Take a passing frame (heartbeat, presence) without blocking; never raise."""

    async def close(self, code: int, reason: str) -> None:
        """Close the underlying connection with a close code."""


class Hub:
    """Fans committed changes out to the subscribers of each workflow."""

    def __init__(self, stats: Stats | None = None) -> None:
        self.stats = stats or Stats()
        # Identifies the database; set when the store opens.
        self.epoch = ""
        # Dicts used as sets, in the order subscribers joined: a set of more
        # than a few takes about twice the memory.
        self._groups: dict[str, dict[Subscriber, None]] = {}
        self._everything: dict[Subscriber, None] = {}
        self._presence_dirty: set[str] = set()
        self._presence_everything = False
        # With several nodes: how many watch each workflow through the others.
        self._elsewhere: dict[str, int] = {}
        # Subscribers that have left since start, for the garbage collector.
        self.left = 0

    def subscribe(self, sub: Subscriber) -> None:
        if sub.workflow_id is None:
            self._everything[sub] = None
            self._presence_everything = True
        else:
            self._groups.setdefault(sub.workflow_id, {})[sub] = None
            self._presence_dirty.add(sub.workflow_id)

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub.workflow_id is None:
            if sub in self._everything:
                del self._everything[sub]
                self.left += 1
            return
        group = self._groups.get(sub.workflow_id)
        if group is None or sub not in group:
            return
        del group[sub]
        self.left += 1
        self._presence_dirty.add(sub.workflow_id)
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

    def _notify(self, group: Iterable[Subscriber], frame: Encoded) -> None:
        for sub in tuple(group):
            try:
                sub.notice(frame)
            except Exception:
                logger.exception("Dropping a subscriber that failed a notice")
                self.unsubscribe(sub)

    def flush_presence(self) -> None:
        """Tell each changed workflow's watchers, and the list pages, who watches.

        Joins and leaves only mark a workflow; this runs on a timer, so a
        thousand sockets arriving at once cost one frame each, not a million.
        """
        dirty, self._presence_dirty = self._presence_dirty, set()
        everything, self._presence_everything = self._presence_everything, False
        counts: dict[str, int] = {}
        for workflow_id in dirty:
            counts[workflow_id] = self.watching(workflow_id)
            group = self._groups.get(workflow_id)
            if group:
                self._notify(group, presence_frame({workflow_id: counts[workflow_id]}))
        if everything:
            watched = self._groups.keys() | self._elsewhere.keys()
            counts = {w: self.watching(w) for w in watched}
        if counts and self._everything:
            self._notify(self._everything, presence_frame(counts))

    async def run_presence(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.flush_presence()

    async def run_heartbeats(self, interval_s: float) -> None:
        """Beat every subscriber once per interval_s, a slice at a time.

        Writing to tens of thousands of sockets at once, and reading their
        pongs, would hold up every other frame, so each sweep is spread over
        the interval. Each slice gets a fresh heartbeat, whose time clients
        trust.
        """
        loop = asyncio.get_running_loop()
        sweep_at = loop.time() + interval_s
        while True:
            await asyncio.sleep(max(0.0, sweep_at - loop.time()))
            groups = (*self._groups.values(), self._everything)
            everyone = [sub for group in groups for sub in group]
            slices = max(1, math.ceil(len(everyone) / BEAT_SLICE))
            for number in range(slices):
                due = sweep_at + number * interval_s / slices
                await asyncio.sleep(max(0.0, due - loop.time()))
                batch = everyone[number * BEAT_SLICE : (number + 1) * BEAT_SLICE]
                self._notify(batch, heartbeat(utc_now()))
            sweep_at = max(sweep_at + interval_s, loop.time())

    def interested(self, workflow_id: str) -> bool:
        """Whether any subscriber here would take a change of this workflow."""
        return bool(self._everything) or workflow_id in self._groups

    def watched_ids(self) -> list[str]:
        """The workflows that have subscribers of their own here."""
        return list(self._groups)

    def held_seqs(self, workflow_id: str) -> list[int]:
        """The last seq each subscriber of the workflow holds (-1: still opening)."""
        return [sub.last_seq for sub in self._groups.get(workflow_id, ())]

    def watching(self, workflow_id: str) -> int:
        """How many watch the workflow, through this node and any other."""
        group = self._groups.get(workflow_id)
        return (len(group) if group else 0) + self._elsewhere.get(workflow_id, 0)

    def watched_here(self) -> dict[str, int]:
        """How many watch each workflow through this node, for the other nodes."""
        return {w: len(g) for w, g in self._groups.items()}

    def set_elsewhere(self, counts: dict[str, int]) -> None:
        """Take how many watch each workflow through the other nodes."""
        before, self._elsewhere = self._elsewhere, counts
        for workflow_id in before.keys() | counts.keys():
            if before.get(workflow_id) != counts.get(workflow_id):
                self._presence_dirty.add(workflow_id)

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
