"""Lean clients for the load generator: WebSocket subscribers and an HTTP publisher.

Both speak the wire protocols directly on asyncio transports, so that one core
can hold tens of thousands of sockets and still read every frame on time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
HEARTBEAT_PREFIX = b'{"type":"heartbeat"'
# A published message starts with the publisher's perf_counter_ns, in 20 digits.
STAMP_DIGITS = 20
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def client_frame(opcode: int, payload: bytes) -> bytes:
    """Encode one masked, final frame, as a client must send it (payload < 126)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def stamped_message(sent_ns: int, size: int) -> str:
    """A message of size ASCII characters that starts with the send time."""
    stamp = f"{sent_ns:0{STAMP_DIGITS}d} "
    return stamp + "x" * (size - len(stamp))


class Tally:
    """What every subscriber of one run saw, added up as frames arrive."""

    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        # When each latency was measured, and when each heartbeat arrived.
        self.received_ns: list[int] = []
        self.heartbeats_ns: list[int] = []
        self.pings_ns: list[int] = []
        self.updates = 0
        self.heartbeats = 0
        self.pings = 0
        # Frames of other types (such as presence), which the checks ignore.
        self.other_frames: Counter[str] = Counter()
        self.protocol_errors: list[str] = []
        self.closed_by_server = 0


class Subscriber(asyncio.Protocol):
    """One WebSocket watching one workflow: snapshot, ready, then updates."""

    __slots__ = (
        "workflow_id",
        "tally",
        "transport",
        "ready",
        "seqs",
        "_key",
        "_request",
        "_buffer",
        "_upgraded",
        "_snapshot_seen",
        "_last_stamp",
    )

    def __init__(self, host: str, port: int, workflow_id: str, tally: Tally) -> None:
        self.workflow_id = workflow_id
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The seq of every update received after `ready`, in arrival order.
        self.seqs: list[int] = []
        self._key = base64.b64encode(os.urandom(16))
        self._request = (
            f"GET /api/workflows/{workflow_id}/updates HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self._buffer = bytearray()
        self._upgraded = False
        self._snapshot_seen = False
        self._last_stamp = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed before ready"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buffer = self._buffer
        buffer += data
        if not self._upgraded and not self._upgrade():
            return
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 4]), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 10]), 10
            end = pos + head + length
            if end > size:
                break
            if not first & 0x80 or second & 0x80:
                self._error("a fragmented or masked frame from the server")
            self._frame(first & 0x0F, bytes(buffer[pos + head : end]), now)
            pos = end
        del buffer[:pos]

    def _upgrade(self) -> bool:
        """Check the 101 answer once its headers are in; True when upgraded."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buffer[:end]).decode("latin-1")
        del buffer[: end + 4]
        accept = base64.b64encode(hashlib.sha1(self._key + WS_GUID).digest()).decode()
        if not head.startswith("HTTP/1.1 101") or accept not in head:
            status = head.split("\r\n", 1)[0]
            self._fail(ConnectionError(f"no WebSocket upgrade: {status}"))
            return False
        self._upgraded = True
        return True

    def _frame(self, opcode: int, payload: bytes, now: int) -> None:
        if opcode == OP_TEXT:
            self._text(payload, now)
        elif opcode == OP_PING:
            self.tally.pings += 1
            self.tally.pings_ns.append(now)
            self._send(client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.tally.closed_by_server += 1
            self._fail(ConnectionError(f"closed by the server: {payload[:2]!r}"))
        elif opcode != OP_PONG:
            self._error(f"unexpected opcode {opcode}")

    def _text(self, payload: bytes, now: int) -> None:
        if payload.startswith(HEARTBEAT_PREFIX):
            self.tally.heartbeats += 1
            self.tally.heartbeats_ns.append(now)
            return
        frame = json.loads(payload)
        kind = frame.get("type")
        if kind == "update":
            if not self.ready.done():
                self._error("an update before the ready frame")
                return
            self.seqs.append(frame["seq"])
            self.tally.updates += 1
            # A frame that repeats the last message (a change made by the server
            # itself) says nothing about that message's latency.
            stamp = str(frame.get("message", ""))[:STAMP_DIGITS]
            if stamp.isdigit() and stamp != self._last_stamp:
                self._last_stamp = stamp
                self.tally.latencies_ns.append(now - int(stamp))
                self.tally.received_ns.append(now)
        elif kind == "snapshot":
            self._snapshot_seen = True
        elif kind == "ready":
            if not self._snapshot_seen:
                self._error("a ready frame before any snapshot")
            if not self.ready.done():
                self.ready.set_result(None)
        else:
            self.tally.other_frames[str(kind)] += 1

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _error(self, what: str) -> None:
        self.tally.protocol_errors.append(f"{self.workflow_id}: {what}")

    def _fail(self, error: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Say goodbye with 1000 and close the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()


async def open_subscriber(
    host: str, port: int, workflow_id: str, tally: Tally, timeout_s: float
) -> Subscriber:
    """Connect, upgrade and wait for the ready frame."""
    loop = asyncio.get_running_loop()
    sub = Subscriber(host, port, workflow_id, tally)
    await asyncio.wait_for(loop.create_connection(lambda: sub, host, port), timeout_s)
    try:
        await asyncio.wait_for(sub.ready, timeout_s)
    except BaseException:
        if sub.transport is not None:
            sub.transport.abort()
        raise
    return sub


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that sends requests one at a time."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self._headers = (
            f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n"
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(
        self, path: str, make_body: Callable[[int], bytes], timeout_s: float = 10
    ) -> tuple[int, bytes, int]:
        """POST make_body(send time in ns); return (status, answer, send time).

        The send time is taken just before the request is written, so a message
        that embeds it tells its subscribers when it left.
        """
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port
            )
        assert self._reader is not None
        sent_ns = time.perf_counter_ns()
        body = make_body(sent_ns)
        self._writer.write(
            f"POST {path} HTTP/1.1\r\n{self._headers}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            head = await asyncio.wait_for(
                self._reader.readuntil(b"\r\n\r\n"), timeout_s
            )
            match = CONTENT_LENGTH.search(head)
            if match is None:
                raise ConnectionError("an answer without Content-Length")
            answer = await self._reader.readexactly(int(match.group(1)))
        except BaseException:
            self.close()
            raise
        return int(head[9:12]), answer, sent_ns

    async def post_json(self, path: str, data: object) -> tuple[int, object]:
        body = json.dumps(data).encode()
        status, answer, _ = await self.post(path, lambda _: body)
        try:
            return status, json.loads(answer)
        except ValueError:
            raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}") from None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
