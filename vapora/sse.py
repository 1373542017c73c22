"""The Server-Sent Events fallback, for networks that block WebSockets.

GET /api/workflows/{id}/events streams the same frames as the WebSocket, each
with its seq as the event id, so a client (a browser's EventSource, or curl)
resumes with Last-Event-ID or `?after=`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from aiohttp import web

from .admission import admit, free_slot, parse_after, take_slot
from .app_keys import HUB, SETTINGS, STORE
from .frames import Encoded, Outgoing
from .subscriber import Subscriber

logger = logging.getLogger(__name__)


class SseSubscriber(Subscriber):
    """An event stream; frames wait in a bounded queue that its handler writes out."""

    __slots__ = (
        "_queue",
        "_queued_bytes",
        "_wake",
        "_drained",
        "_closed",
        "_transport",
    )

    transport_name = "event stream"

    def __init__(self, request: web.Request, workflow_id: str) -> None:
        super().__init__(
            workflow_id, request.app[STORE], request.app[SETTINGS], request.remote
        )
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._closed = False
        self._transport = request.transport

    def _put(self, data: bytes) -> None:
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._drained.clear()
        self._wake.set()

    def send(self, out: Outgoing) -> bool:
        if self._queued_bytes > self.settings.max_queue_bytes:
            return False
        self._put(out.sse)
        return True

    def send_own(self, frame: Encoded) -> None:
        self._put(frame.sse)

    def send_notice(self, frame: Encoded) -> None:
        if self._queued_bytes <= self.settings.max_queue_bytes:
            self._put(frame.sse)

    async def drained(self) -> None:
        await self._drained.wait()

    @property
    def closing(self) -> bool:
        return self._closed

    def abort(self, code: int, reason: str) -> None:
        self._closed = True
        self._wake.set()
        if self._transport is not None:
            self._transport.abort()

    async def close(self, code: int, reason: str) -> None:
        # Ends the stream cleanly; the client reconnects with Last-Event-ID.
        self._closed = True
        self._wake.set()

    async def pump(self, response: web.StreamResponse) -> None:
        """Write queued frames until the stream ends or the client is too slow."""
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and not self._closed:
                data = self._queue.popleft()
                self._queued_bytes -= len(data)
                await response.write(data)
            self._drained.set()


async def workflow_events(request: web.Request) -> web.StreamResponse:
    """Stream one workflow's changes as Server-Sent Events; 400, 401, 404, 429."""
    workflow_id = request.match_info["workflow_id"]
    after = parse_after(request)
    await admit(request, workflow_id)
    take_slot(request)
    try:
        return await _stream(request, workflow_id, after)
    finally:
        free_slot(request)


async def _stream(
    request: web.Request, workflow_id: str, after: int | None
) -> web.StreamResponse:
    store = request.app[STORE]
    # A browser resuming by itself sends Last-Event-ID but no epoch: trust ours.
    epoch = request.query.get("epoch") or store.epoch

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    sub = SseSubscriber(request, workflow_id)
    hub = request.app[HUB]

    hub.subscribe(sub)
    try:
        await response.write(b"retry: 2000\n\n")
        await sub.open("connect", after, epoch)
        await sub.pump(response)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.unsubscribe(sub)
        sub.stop()
    return response
