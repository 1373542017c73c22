"""The WebSocket transport: one socket per page, fed by the hub.

Live frames are written straight to the connection's transport as bytes framed
once per change (see frames.py), so publishing costs one buffer append per
socket. The transport's high-water mark is max_queue_bytes: past it the socket
falls behind and catches up from a snapshot (see subscriber.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from .admission import admit, free_slot, parse_after, take_slot
from .app_keys import HUB, SETTINGS, STORE
from .errors import InvalidInput
from .frames import OP_CLOSE, Encoded, Outgoing, ws_frame
from .subscriber import Subscriber

logger = logging.getLogger(__name__)

# What ws.receive() gives once the socket is closing or closed.
ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)


class WsSubscriber(Subscriber):
    """A WebSocket whose frames go straight onto its transport."""

    __slots__ = ("ws", "transport", "protocol")

    transport_name = "WebSocket"

    def __init__(
        self, request: web.Request, ws: web.WebSocketResponse, workflow_id: str | None
    ) -> None:
        settings = request.app[SETTINGS]
        super().__init__(workflow_id, request.app[STORE], settings, request.remote)
        transport = request.transport
        assert transport is not None
        self.ws = ws
        self.transport = transport
        self.protocol: Any = request.protocol
        transport.set_write_buffer_limits(high=settings.max_queue_bytes)
        keep_alive(transport, settings.heartbeat_s)

    def send(self, out: Outgoing) -> bool:
        if self.protocol.writing_paused:
            return False
        self.transport.write(out.ws)
        return True

    def send_own(self, frame: Encoded) -> None:
        self.transport.write(frame.ws)

    def send_notice(self, frame: Encoded) -> None:
        if not self.protocol.writing_paused:
            self.transport.write(frame.ws)

    async def drained(self) -> None:
        while self.protocol.writing_paused and not self.transport.is_closing():
            await self.protocol._drain_helper()

    @property
    def closing(self) -> bool:
        return bool(self.transport.is_closing())

    def abort(self, code: int, reason: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(
                ws_frame(code.to_bytes(2, "big") + reason.encode(), OP_CLOSE)
            )
            self.transport.abort()

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())


def keep_alive(transport: asyncio.Transport, interval_s: float) -> None:
    """Have the kernel drop the connection of a peer silent for about 2 intervals."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_KEEPIDLE"):
        return
    seconds = max(1, round(interval_s))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)


async def subscribe(request: web.Request) -> web.WebSocketResponse:
    """Stream one workflow's changes, or every workflow's on /api/updates.

    Refuses with 400 for a bad `after` or no upgrade, 401, 403 for a foreign
    origin, 404, 429.
    """
    # One frame for the socket's whole life: each coroutine it waits in is kept
    # for as long as the socket is open.
    workflow_id = request.match_info.get("workflow_id")
    after = None if workflow_id is None else parse_after(request)
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise InvalidInput(
            "Upgrade",
            "this address takes WebSocket connections: send Upgrade: websocket",
        )
    await admit(request, workflow_id)
    take_slot(request)
    try:
        # No ping timer per socket: the hub pings every socket with its
        # heartbeat, and the kernel's keepalive finds peers that vanished.
        ws = web.WebSocketResponse(
            compress=False,
            max_msg_size=request.app[SETTINGS].max_incoming_bytes,
        )
        await ws.prepare(request)
        # Sent with the handshake, the headers would otherwise stay in memory
        # for the socket's whole life.
        ws.headers.clear()
        sub = WsSubscriber(request, ws, workflow_id)

        request.app[HUB].subscribe(sub)
        try:
            await sub.open("connect", after, request.query.get("epoch"))
            while (msg := await ws.receive()).type not in ENDED:
                if msg.type is WSMsgType.ERROR:
                    logger.warning(
                        "WebSocket error from %s: %s", request.remote, ws.exception()
                    )
        finally:
            request.app[HUB].unsubscribe(sub)
            sub.stop()
            release_connection(request)
    finally:
        free_slot(request)
    return ws


def release_connection(request: web.Request) -> None:
    """Break the cycle aiohttp leaves between a closed socket and its connection.

    The connection's protocol keeps a callback into the WebSocketResponse, whose
    reader points back at the protocol, so without this every closed socket
    waits for a full garbage collection to be freed.
    """
    # TODO(aiohttp clears _data_received_cb in connection_lost): drop this.
    protocol = request.protocol
    if getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None


async def close_all_sockets(app: web.Application) -> None:
    """On shutdown, tell every client the server is going away (1001)."""
    hub = app[HUB]
    try:
        await asyncio.wait_for(
            hub.close_all(WSCloseCode.GOING_AWAY, "server shutting down"),
            app[SETTINGS].shutdown_timeout_s,
        )
    except TimeoutError:
        logger.warning("%d subscribers did not close in time", hub.subscribers())
