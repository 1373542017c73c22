"""The WebSocket transport: one socket per page, fed by the hub.

Live frames are written straight to the connection's transport as bytes framed
once per change (see frames.py), so publishing costs one buffer append per
socket and never waits. A socket whose buffer passes max_queue_bytes stops
receiving updates; once it drains it gets one fresh snapshot, which supersedes
everything it missed. One that stays full past stuck_timeout_s is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from .app_keys import HUB, SETTINGS, STORE
from .catchup import list_snapshot_text, opening_frames, snapshot_text
from .errors import InvalidInput
from .frames import OP_CLOSE, Outgoing, ws_frame
from .settings import Settings
from .store import Store

logger = logging.getLogger(__name__)

# Close code telling the client it fell behind and should reconnect and resume.
CLOSE_RESUME = 4001
LIST_LIMIT = 100


class WsSubscriber:
    """One WebSocket watching one workflow (or, with workflow_id None, all)."""

    __slots__ = (
        "workflow_id",
        "ws",
        "transport",
        "protocol",
        "store",
        "settings",
        "peer",
        "last_seq",
        "_backlog",
        "_lagging",
        "_recovery",
    )

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        workflow_id: str | None,
        store: Store,
        settings: Settings,
    ) -> None:
        transport = request.transport
        assert transport is not None
        self.workflow_id = workflow_id
        self.ws = ws
        self.transport = transport
        self.protocol: Any = request.protocol
        self.store = store
        self.settings = settings
        self.peer = request.remote
        self.last_seq = -1
        # While catching up, live changes wait here; None once live.
        self._backlog: list[Outgoing] | None = []
        self._lagging = False
        self._recovery: asyncio.Task[None] | None = None
        transport.set_write_buffer_limits(high=settings.max_queue_bytes)

    def deliver(self, out: Outgoing) -> None:
        if self.workflow_id is not None and out.seq <= self.last_seq:
            return
        if self._lagging:
            return
        if self._backlog is not None:
            if len(self._backlog) < self.settings.max_resume_events:
                self._backlog.append(out)
            else:
                self._fall_behind()
            return
        self._write(out)

    def _write(self, out: Outgoing) -> None:
        if self.transport.is_closing():
            return
        if self.protocol.writing_paused:
            self._fall_behind()
            return
        self.transport.write(out.ws)
        if self.workflow_id is not None:
            self.last_seq = out.seq

    def _fall_behind(self) -> None:
        self._lagging = True
        self._backlog = None
        if self._recovery is None:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        try:
            await asyncio.wait_for(self._drained(), self.settings.stuck_timeout_s)
        except TimeoutError:
            logger.warning(
                "Closing a WebSocket from %s that took no data for %.0f s",
                self.peer,
                self.settings.stuck_timeout_s,
            )
            self._abort(CLOSE_RESUME, "too slow; reconnect and resume")
            return
        finally:
            self._recovery = None
        self._backlog = []
        self._lagging = False
        await self.open("collapsed")

    async def _drained(self) -> None:
        while self.protocol.writing_paused and not self.transport.is_closing():
            await self.protocol._drain_helper()

    async def open(self, reason: str, after: int | None = None, epoch: str | None = None) -> None:
        """Send the opening frames, then everything that arrived meanwhile."""
        if self.workflow_id is None:
            texts = [await list_snapshot_text(self.store, LIST_LIMIT)]
            seq = -1
        elif reason == "collapsed":
            text, seq = await snapshot_text(self.store, self.workflow_id, reason)
            texts = [text]
        else:
            texts, seq = await opening_frames(
                self.store, self.workflow_id, after, epoch, self.settings.max_resume_events
            )
        if self._lagging or self.transport.is_closing():
            return
        for text in texts:
            self.transport.write(ws_frame(text.encode()))
        self.last_seq = max(self.last_seq, seq)
        backlog, self._backlog = self._backlog or [], None
        for out in backlog:
            self.deliver(out)

    def _abort(self, code: int, reason: str) -> None:
        close = ws_frame(code.to_bytes(2, "big") + reason.encode(), OP_CLOSE)
        if not self.transport.is_closing():
            self.transport.write(close)
            self.transport.abort()

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())


def parse_after(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None or raw == "":
        return None
    try:
        after = int(raw)
    except ValueError:
        raise InvalidInput("after", f"after must be a seq number, got {raw!r}") from None
    if after < 0:
        raise InvalidInput("after", f"after must not be negative, got {raw!r}")
    return after


async def workflow_socket(request: web.Request) -> web.WebSocketResponse:
    """Stream one workflow's changes; 404 for an unknown id, 400 for a bad `after`."""
    store = request.app[STORE]
    workflow_id = request.match_info["workflow_id"]
    after = parse_after(request)
    await store.get_workflow(workflow_id)

    return await _serve(request, workflow_id, after, request.query.get("epoch"))


async def list_socket(request: web.Request) -> web.WebSocketResponse:
    """Stream every workflow's changes, for the list page."""
    return await _serve(request, None, None, None)


async def _serve(
    request: web.Request, workflow_id: str | None, after: int | None, epoch: str | None
) -> web.WebSocketResponse:
    settings = request.app[SETTINGS]
    hub = request.app[HUB]
    ws = web.WebSocketResponse(
        heartbeat=settings.heartbeat_s,
        compress=False,
        max_msg_size=settings.max_incoming_bytes,
    )
    await ws.prepare(request)
    sub = WsSubscriber(request, ws, workflow_id, request.app[STORE], settings)

    hub.subscribe(sub)
    try:
        await sub.open("connect", after, epoch)
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                logger.warning("WebSocket error from %s: %s", request.remote, ws.exception())
    finally:
        hub.unsubscribe(sub)
        if sub._recovery is not None:
            sub._recovery.cancel()
    return ws


async def close_all_sockets(app: web.Application) -> None:
    """On shutdown, tell every client the server is going away (1001)."""
    await app[HUB].close_all(WSCloseCode.GOING_AWAY, "server shutting down")
