"""Wire encodings of a change, built once per change and shared by every socket.

A frame's JSON text is made by splicing the stored payload (the JSON object saved
with the event) after a short prefix, so no change is serialised per subscriber.
"""

from __future__ import annotations

import struct
from typing import Any

from .model import to_json
from .store import Change

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9


def frame_text(kind: str, epoch: str, payload: str, **extra: Any) -> str:
    """Return `payload` (a JSON object) with type, epoch and extra fields first."""
    head = {"type": kind, "epoch": epoch, **extra}
    prefix = to_json(head)
    if payload == "{}":
        return prefix
    return prefix[:-1] + "," + payload[1:]


def ws_frame(data: bytes, opcode: int = OP_TEXT) -> bytes:
    """Encode one unmasked, final WebSocket frame, as a server sends it."""
    length = len(data)
    first = 0x80 | opcode
    if length < 126:
        header = struct.pack("!BB", first, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + data


def sse_event(seq: int | None, event: str, text: str) -> bytes:
    """Encode one Server-Sent Event; its id is the seq, for Last-Event-ID."""
    lines = [f"event: {event}"]
    if seq is not None:
        lines.append(f"id: {seq}")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


class Encoded:
    """A frame's JSON text with its wire encodings, each made at most once."""

    __slots__ = ("event", "seq", "_text", "_ws", "_sse")

    def __init__(self, event: str, seq: int | None, text: bytes | None = None) -> None:
        self.event = event
        self.seq = seq
        self._text = text
        self._ws: bytes | None = None
        self._sse: bytes | None = None

    @property
    def text(self) -> bytes:
        assert self._text is not None
        return self._text

    @property
    def ws(self) -> bytes:
        if self._ws is None:
            self._ws = ws_frame(self.text)
        return self._ws

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = sse_event(self.seq, self.event, self.text.decode())
        return self._sse


class Outgoing(Encoded):
    """One committed change on its way out; its text is built on first use."""

    __slots__ = ("change", "epoch")

    def __init__(self, change: Change, epoch: str) -> None:
        super().__init__("update", change.seq)
        self.change = change
        self.epoch = epoch

    @property
    def text(self) -> bytes:
        if self._text is None:
            self._text = frame_text("update", self.epoch, self.change.payload).encode()
        return self._text


def heartbeat(now: str) -> Encoded:
    """The heartbeat every subscriber gets; on a WebSocket, a ping goes with it."""
    beat = Encoded(
        "heartbeat", None, frame_text("heartbeat", "", "{}", now=now).encode()
    )
    # One shared ping for every socket, instead of a timer per socket.
    beat._ws = ws_frame(b"", OP_PING) + ws_frame(beat.text)
    return beat


def presence_frame(watching: dict[str, int]) -> Encoded:
    """How many watch each workflow now: not history, so it has no seq."""
    text = to_json({"type": "presence", "watching": watching})
    return Encoded("presence", None, text.encode())
