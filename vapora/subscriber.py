"""What every transport's subscriber does between the hub and its connection.

A subscriber is first catching up (changes that arrive wait in a backlog while
it sends what the store says), then live (each change is sent at once), and
falls behind when its connection cannot take more: it then ignores changes
until the connection drains, and sends one fresh snapshot, which supersedes
everything it skipped. A connection that stays full past stuck_timeout_s is
closed with CLOSE_RESUME.
"""

from __future__ import annotations

import asyncio
import logging

from .catchup import list_snapshot, opening_frames, ready_frame, snapshot
from .frames import Encoded, Outgoing
from .settings import Settings
from .store import Store

logger = logging.getLogger(__name__)

# Close code telling a client it fell behind and should reconnect and resume.
CLOSE_RESUME = 4001
LIST_LIMIT = 100


class Subscriber:
    """A connection watching one workflow (or, with workflow_id None, all)."""

    __slots__ = (
        "workflow_id",
        "store",
        "settings",
        "peer",
        "last_seq",
        "_backlog",
        "_lagging",
        "_recovery",
        "_notice",
    )

    transport_name = "subscriber"

    def __init__(
        self,
        workflow_id: str | None,
        store: Store,
        settings: Settings,
        peer: str | None,
    ) -> None:
        self.workflow_id = workflow_id
        self.store = store
        self.settings = settings
        self.peer = peer
        self.last_seq = -1
        # While catching up, live changes wait here; None once live.
        self._backlog: list[Outgoing] | None = []
        self._lagging = False
        self._recovery: asyncio.Task[None] | None = None
        self._notice: Encoded | None = None

    # -- what a transport provides ---------------------------------------------

    def send(self, out: Outgoing) -> bool:
        """Queue one change without waiting; False when the connection is full."""
        raise NotImplementedError

    def send_own(self, frame: Encoded) -> None:
        """Queue one frame made for this subscriber alone (snapshots, catch-up)."""
        raise NotImplementedError

    def send_notice(self, frame: Encoded) -> None:
        """Queue a passing frame (heartbeat, presence) unless the link is full."""
        raise NotImplementedError

    async def drained(self) -> None:
        """Return once the connection has room again."""
        raise NotImplementedError

    def abort(self, code: int, reason: str) -> None:
        """Drop the connection, telling the client why if it can still hear."""
        raise NotImplementedError

    @property
    def closing(self) -> bool:
        raise NotImplementedError

    async def close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    # -- the state machine -------------------------------------------------------

    def deliver(self, out: Outgoing) -> None:
        """Take one change from the hub; never waits, never raises."""
        seq = out.change.seq
        if self.workflow_id is not None and seq <= self.last_seq:
            return
        if self._lagging:
            return
        if self._backlog is not None:
            if len(self._backlog) < self.settings.max_resume_events:
                self._backlog.append(out)
            else:
                self._fall_behind()
            return
        if self.closing:
            return
        if not self.send(out):
            self._fall_behind()
            return
        if self.workflow_id is not None:
            self.last_seq = seq

    def notice(self, frame: Encoded) -> None:
        """Take a frame that is not part of the history; dropped when behind."""
        if self._lagging or self.closing:
            return
        if self._backlog is not None:
            # Nothing may come before the catch-up; the latest presence waits.
            if frame.event == "presence":
                self._notice = frame
            return
        self.send_notice(frame)

    async def open(
        self, reason: str, after: int | None = None, epoch: str | None = None
    ) -> None:
        """Send the opening frames, then whatever arrived meanwhile."""
        if self.workflow_id is None:
            frames = [await list_snapshot(self.store, LIST_LIMIT)]
        elif reason == "collapsed":
            frames = [await snapshot(self.store, self.workflow_id, reason)]
        else:
            frames = await opening_frames(
                self.store,
                self.workflow_id,
                after,
                epoch,
                self.settings.max_resume_events,
            )
        if after is not None:
            served = "snapshot" if frames and frames[0].event == "snapshot" else "log"
            self.store.stats.resumes[served] += 1
        if self._lagging or self.closing:
            return
        for frame in frames:
            self.send_own(frame)
            if frame.seq is not None:
                self.last_seq = frame.seq
        if after is not None and not frames:
            self.last_seq = after
        # Says the catch-up is over, even when there was nothing to catch up on,
        # so a client knows at once that its link works.
        self.send_own(
            ready_frame(self.store.epoch, self.last_seq, self.settings.heartbeat_s)
        )
        if self._notice is not None:
            self.send_notice(self._notice)
            self._notice = None
        backlog, self._backlog = self._backlog or [], None
        for out in backlog:
            self.deliver(out)

    def _fall_behind(self) -> None:
        self.store.stats.updates_collapsed += 1
        self._lagging = True
        self._backlog = None
        if self._recovery is None:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        try:
            await asyncio.wait_for(self.drained(), self.settings.stuck_timeout_s)
        except TimeoutError:
            logger.warning(
                "Closing a %s from %s that took no data for %.0f s",
                self.transport_name,
                self.peer,
                self.settings.stuck_timeout_s,
            )
            self.store.stats.slow_clients_closed += 1
            self.abort(CLOSE_RESUME, "too slow; reconnect and resume")
            return
        finally:
            self._recovery = None
        self._backlog = []
        self._lagging = False
        await self.open("collapsed")

    def stop(self) -> None:
        """Cancel any pending recovery, once the connection has ended."""
        if self._recovery is not None:
            self._recovery.cancel()
