"""Each workflow's changes, handed to the hub once each and in seq order.

With a broker, a node hears of changes from two sources that race: its own
commits, at once, and every node's through the broker, a moment later and in
the order they reached it; and it hears nothing from the broker while the
broker is away. Every change carries its seq, so a gap shows: the sequencer
holds back what came early, reads what is missing from the store's event log,
and gives the hub an unbroken run from the seq its subscribers already hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .hub import Hub
from .model import Status
from .store import Change, Store

logger = logging.getLogger(__name__)

FILL_BATCH = 500
# How long to wait for new subscribers' opening frames, which say what they hold.
OPENING_WAIT_S = 10.0
OPENING_POLL_S = 0.005
RETRY_S = 1.0
MAX_TRACKS = 10_000


@dataclass(slots=True)
class Track:
    """What the hub has had of one workflow, and what came early."""

    delivered: int | None = None  # unknown until the subscribers have opened
    early: dict[int, Change] = field(default_factory=dict)
    behind: bool = False  # the store may hold changes that never came
    filling: asyncio.Task[None] | None = None


def change_from_event(workflow_id: str, seq: int, payload: str) -> Change:
    """Rebuild a committed change from its event in the store."""
    fields = json.loads(payload)
    return Change(
        workflow_id,
        seq,
        payload,
        Status(fields["status"]),
        time.monotonic(),
        fields.get("kind", "update"),
    )


class Sequencer:
    """Puts changes from every source in order, filling gaps from the store."""

    def __init__(self, store: Store, hub: Hub) -> None:
        self.store = store
        self.hub = hub
        self._tracks: OrderedDict[str, Track] = OrderedDict()

    def offer(self, change: Change) -> None:
        """Take a committed change from any source; never waits."""
        workflow_id = change.workflow_id
        if not self.hub.interested(workflow_id):
            self._tracks.pop(workflow_id, None)
            return
        track = self._tracks.get(workflow_id)
        if track is None:
            track = self._track(workflow_id)
        else:
            self._tracks.move_to_end(workflow_id)
        if track.delivered is None and track.filling is None:
            track.delivered = self._baseline(workflow_id, change.seq)
        if track.delivered is not None and change.seq <= track.delivered:
            return
        if (
            track.filling is None
            and track.delivered is not None
            and change.seq == track.delivered + 1
        ):
            self._deliver(track, change)
            return
        track.early.setdefault(change.seq, change)
        self._fill(workflow_id, track)

    def catch_up(self) -> None:
        """Have every watched workflow read what it may have missed from the store."""
        for workflow_id in self.hub.watched_ids():
            track = self._tracks.get(workflow_id) or self._track(workflow_id)
            track.behind = True
            self._fill(workflow_id, track)

    async def sweep_forever(self, interval_s: float) -> None:
        """Every interval_s, catch up the watched workflows the store has moved on.

        A node that dies after committing a change and before publishing it
        leaves the others a change they never hear of, until a later change to
        the same workflow shows the gap. This bounds how long that can last.
        """
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception as error:  # the store is away: the next sweep retries
                logger.warning(
                    "Cannot compare watched workflows with the store: %s", error
                )

    async def sweep(self) -> None:
        """Fill every watched workflow whose stored seq is past what was delivered."""
        stored = await self.store.seqs(self.hub.watched_ids())
        for workflow_id, seq in stored.items():
            track = self._tracks.get(workflow_id)
            if track is not None and track.delivered is not None:
                delivered: int | None = track.delivered
            else:
                delivered = self._least_held(workflow_id)
            if delivered is not None and seq > delivered:
                track = track or self._track(workflow_id)
                track.behind = True
                self._fill(workflow_id, track)

    def stop(self) -> None:
        """Abandon every fill under way, as the node shuts down."""
        for track in self._tracks.values():
            if track.filling is not None:
                track.filling.cancel()

    def _track(self, workflow_id: str) -> Track:
        if len(self._tracks) >= MAX_TRACKS:
            # Forget the least recently changed workflow that is not being filled.
            for old_id, old in self._tracks.items():
                if old.filling is None:
                    del self._tracks[old_id]
                    break
        track = self._tracks[workflow_id] = Track()
        return track

    def _baseline(self, workflow_id: str, first: int | None) -> int | None:
        """The seq after which this node's subscribers need every change, if known.

        It is the least seq any of them holds; a subscriber still reading its
        opening frames holds none yet. List pages alone need only the order,
        from the first change to deliver.
        """
        held = self.hub.held_seqs(workflow_id)
        if not held:
            return None if first is None else first - 1
        least = min(held)
        return least if least >= 0 else None

    def _deliver(self, track: Track, change: Change) -> None:
        track.delivered = change.seq
        self.hub.publish(change)

    def _deliver_early(self, track: Track, up_to: int) -> None:
        """Deliver what came early, in order, skipping holes below up_to."""
        assert track.delivered is not None
        for seq in sorted(track.early):
            if seq > up_to and seq != track.delivered + 1:
                break
            change = track.early.pop(seq)
            if seq > track.delivered:
                self._deliver(track, change)

    def _fill(self, workflow_id: str, track: Track) -> None:
        if track.filling is None:
            loop = asyncio.get_running_loop()
            track.filling = loop.create_task(self._fill_gaps(workflow_id, track))

    async def _fill_gaps(self, workflow_id: str, track: Track) -> None:
        try:
            while self._tracks.get(workflow_id) is track:
                if not self.hub.interested(workflow_id):
                    del self._tracks[workflow_id]
                    return
                try:
                    if track.delivered is None:
                        track.delivered = await self._wait_for_baseline(
                            workflow_id, track
                        )
                    self._deliver_early(track, track.delivered)
                    if not (track.early or track.behind):
                        return
                    await self._read_missed(workflow_id, track)
                except Exception as error:  # the store is away: try again shortly
                    logger.warning(
                        "Cannot read the missed changes of %s: %s", workflow_id, error
                    )
                    track.behind = True
                    await asyncio.sleep(RETRY_S)
        finally:
            track.filling = None

    async def _read_missed(self, workflow_id: str, track: Track) -> None:
        """Deliver the events after the last delivered seq, from the store."""
        assert track.delivered is not None
        # Whatever came early so far was committed before this read starts,
        # so the store has everything below it, unless retention pruned it.
        known = max(track.early, default=track.delivered)
        track.behind = False
        events = await self.store.events_after(workflow_id, track.delivered, FILL_BATCH)
        for seq, payload in events:
            if seq > track.delivered:
                track.early.pop(seq, None)
                self._deliver(track, change_from_event(workflow_id, seq, payload))
        if len(events) == FILL_BATCH:
            track.behind = True
        else:
            self._deliver_early(track, known)

    async def _wait_for_baseline(self, workflow_id: str, track: Track) -> int:
        deadline = time.monotonic() + OPENING_WAIT_S
        while time.monotonic() < deadline:
            baseline = self._baseline(workflow_id, min(track.early, default=None))
            if baseline is not None:
                return baseline
            if not self.hub.held_seqs(workflow_id):
                break
            await asyncio.sleep(OPENING_POLL_S)
        least = self._least_held(workflow_id)
        if least is not None:
            return least
        # No one here holds anything yet: start from the stored state.
        return (await self.store.seqs([workflow_id])).get(workflow_id, 0)

    def _least_held(self, workflow_id: str) -> int | None:
        """The least seq a subscriber here holds; None while all are still opening."""
        held = [seq for seq in self.hub.held_seqs(workflow_id) if seq >= 0]
        return min(held, default=None)
