"""The client side of the API: calls for scripts, and following a workflow live.

Every address is the server's URL with a path appended, so a server behind a base
path works once the URL names it. A failed call raises ApiError, whose text is fit
to show a person.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import aiohttp

from .model import Status

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
STATUSES = tuple(s.value for s in Status)
FINAL_STATUSES = frozenset(s.value for s in Status if s.is_final)

CALL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# The server's heartbeat comes every 20 s unless it is set otherwise.
SILENCE_S = 45.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 10.0
CLOSE_TIMEOUT_S = 2.0
MAX_FRAME_BYTES = 16 * 1024 * 1024

# A refusal that no retry will change, once the workflow has been seen.
REFUSED_FOR_GOOD = frozenset({401, 403, 404})


class ApiError(Exception):
    """A call that failed, with a message for a person."""


def check_url(url: str) -> str:
    """Return the server's URL without a trailing slash; ValueError if it is bad."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the URL must start with http:// or https://, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the URL must not carry a query or fragment, got {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    state: str


@dataclass(frozen=True, slots=True)
class Progress:
    """A workflow's state, as an API answer or a frame carries it."""

    workflow_id: str
    name: str
    status: str
    current_step: int
    total_steps: int
    message: str
    steps: tuple[Step, ...]
    seq: int

    @classmethod
    def from_json(cls, data: Any) -> Progress:
        """Read a workflow's state; ValueError when it is not one."""
        try:
            steps = tuple(Step(str(s["name"]), str(s["state"])) for s in data["steps"])
            return cls(
                workflow_id=str(data["workflow_id"]),
                name=str(data["name"]),
                status=str(data["status"]),
                current_step=int(data["current_step"]),
                total_steps=int(data["total_steps"]),
                message=str(data.get("message") or ""),
                steps=steps,
                seq=int(data["seq"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(
                "the server sent something other than a workflow"
            ) from None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def percent(self) -> int:
        if self.status == "completed":
            return 100
        done = sum(1 for s in self.steps if s.state == "done")
        return round(100 * done / len(self.steps)) if self.steps else 0


def error_message(url: str, status: int, reason: str | None, body: str) -> str:
    """Return the server's own message for a refusal, else one naming the URL."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    if isinstance(message, str) and message:
        return message
    hint = " (is the URL right?)" if status == 404 else ""
    return f"{url} answered {status} {reason or ''}".rstrip() + hint


def unreachable(url: str, error: BaseException) -> str:
    """Describe a server that could not be reached at all."""
    if isinstance(error, aiohttp.ClientConnectorError):
        cause = error.os_error
        if isinstance(cause, ConnectionRefusedError):
            detail = "connection refused"
        else:
            detail = cause.strerror or str(cause)
    elif isinstance(error, TimeoutError):
        detail = "no answer in time"
    else:
        detail = str(error) or type(error).__name__
    return f"cannot reach the server at {url}: {detail}"


class Api:
    """Calls to one server with one token; use it as an async context manager."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = check_url(url)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        # No total timeout here: it would cut a WebSocket that lives for hours.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=CALL_TIMEOUT_S
        )
        self._session = aiohttp.ClientSession(timeout=timeout)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Api in an async with block"
        return self._session

    def workflow_url(self, workflow_id: str, action: str = "") -> str:
        url = f"{self.url}/api/workflows/{quote(workflow_id, safe='')}"
        return f"{url}/{action}" if action else url

    async def create(
        self, name: str, steps: list[str], message: str | None
    ) -> Progress:
        body: dict[str, Any] = {"name": name, "steps": steps}
        if message is not None:
            body["message"] = message
        return await self._call("POST", f"{self.url}/api/workflows", body)

    async def get(self, workflow_id: str) -> Progress:
        return await self._call("GET", self.workflow_url(workflow_id))

    async def advance(self, workflow_id: str, message: str | None) -> Progress:
        body = {} if message is None else {"message": message}
        return await self._call("POST", self.workflow_url(workflow_id, "advance"), body)

    async def set_status(
        self, workflow_id: str, status: str, message: str | None
    ) -> Progress:
        body = {"status": status}
        if message is not None:
            body["message"] = message
        return await self._call("POST", self.workflow_url(workflow_id, "status"), body)

    async def set_message(self, workflow_id: str, message: str) -> Progress:
        url = self.workflow_url(workflow_id, "message")
        return await self._call("POST", url, {"message": message})

    async def _call(
        self, method: str, url: str, body: dict[str, Any] | None = None
    ) -> Progress:
        try:
            async with self.session.request(
                method,
                url,
                json=body,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
            ) as response:
                status, reason = response.status, response.reason
                text = await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiError(unreachable(self.url, error)) from None

        if status == 401 and not self.headers:
            raise ApiError("this needs a token: set VAPORA_TOKEN or pass --token")
        if status >= 400:
            raise ApiError(error_message(url, status, reason, text))
        try:
            return Progress.from_json(json.loads(text))
        except ValueError:
            raise ApiError(
                f"{url} answered with something other than a workflow"
            ) from None


class View(Protocol):
    """Where a followed workflow is shown."""

    def show(self, progress: Progress) -> None:
        """Show a new state of the workflow."""

    def live(self) -> None:
        """Say the stream is live: every change from now on arrives as it happens."""

    def lost(self, reason: str) -> None:
        """Say the connection was lost, and that it is being tried again."""


def backoff_s(failures: int) -> float:
    """Exponential backoff with full jitter, so clients do not return together."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(failures, 16))
    return random.uniform(0, ceiling)


WebSocket = aiohttp.ClientWebSocketResponse[Literal[True]]


class Watcher:
    """Follows one workflow over its WebSocket until it finishes, resuming after drops.

    Before the first snapshot any failure ends the watch; after it, only a refusal
    that no retry will change (401, 403, 404) does, and everything else is retried.
    """

    def __init__(
        self, api: Api, workflow_id: str, view: View, silence_s: float = SILENCE_S
    ) -> None:
        self.api = api
        self.workflow_id = workflow_id
        self.view = view
        self.silence_s = silence_s
        self.progress: Progress | None = None
        self.epoch: str | None = None
        self.live = False
        self.heard = False
        self.finished: Progress | None = None

    async def run(self) -> Progress:
        """Return the workflow's final state; ApiError if it cannot be followed."""
        failures = 0
        while True:
            reason = await self._follow_once()
            if self.finished is not None:
                return self.finished

            failures = 1 if self.heard else failures + 1
            delay = backoff_s(failures)
            logger.debug("Connection lost (%s); retrying in %.1f s", reason, delay)
            self.view.lost(reason)
            await asyncio.sleep(delay)

    def socket_url(self) -> str:
        url = self.api.workflow_url(self.workflow_id, "updates")
        if self.progress is None or self.epoch is None:
            return url
        return f"{url}?after={self.progress.seq}&epoch={quote(self.epoch, safe='')}"

    async def _follow_once(self) -> str:
        """Connect once and take frames until the link ends; return why it ended."""
        self.live = self.heard = False
        try:
            async with self.api.session.ws_connect(
                self.socket_url(),
                headers=self.api.headers,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                max_msg_size=MAX_FRAME_BYTES,
            ) as ws:
                return await self._take_frames(ws)
        except aiohttp.WSServerHandshakeError as error:
            await self._check_refusal(error.status, error.message)
            return f"the server answered {error.status} {error.message}"
        except (aiohttp.ClientError, TimeoutError) as error:
            if self.progress is None:
                raise ApiError(unreachable(self.api.url, error)) from None
            return unreachable(self.api.url, error)

    async def _check_refusal(self, status: int, reason: str) -> None:
        """Raise ApiError, with the server's own words, for a refusal that will last."""
        first = self.progress is None
        if status in REFUSED_FOR_GOOD or (first and status != 429):
            # The handshake's answer is not readable; a plain GET says why.
            await self.api.get(self.workflow_id)
            raise ApiError(f"the server refused to stream the workflow: {reason}")

    async def _take_frames(self, ws: WebSocket) -> str:
        while True:
            try:
                msg = await ws.receive(timeout=self.silence_s)
            except TimeoutError:
                return f"heard nothing for {self.silence_s:.0f} s"

            if msg.type is aiohttp.WSMsgType.TEXT:
                self.heard = True
                self._take(msg.data)
                if self.finished is not None:
                    return "finished"
            elif msg.type is aiohttp.WSMsgType.ERROR:
                return f"the connection failed: {ws.exception()}"
            elif msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                code = ws.close_code
                return f"the connection closed ({code})"

    def _take(self, text: str) -> None:
        """Apply one frame: a snapshot or update replaces the state; ready goes live."""
        try:
            frame = json.loads(text)
            kind = frame.get("type")
        except (ValueError, AttributeError):
            logger.debug("Ignoring a frame that is not a JSON object: %.80r", text)
            return

        if kind == "ready":
            self.live = True
            self.view.live()
            heartbeat = frame.get("heartbeat_s")
            if isinstance(heartbeat, int | float) and heartbeat > 0:
                # Silence past a few missed heartbeats means a dead link.
                self.silence_s = max(self.silence_s, 2.5 * heartbeat + 2)
        elif kind in ("snapshot", "update"):
            try:
                progress = Progress.from_json(frame)
            except ValueError:
                logger.debug("Ignoring a %s frame without a workflow", kind)
                return
            epoch = str(frame.get("epoch", ""))
            if kind == "update" and self._seen(progress, epoch):
                return
            self.progress, self.epoch = progress, epoch
            self.view.show(progress)

        # A replayed change may be undone by a later one: only the live state counts.
        if self.live and self.progress is not None and self.progress.is_final:
            self.finished = self.progress

    def _seen(self, progress: Progress, epoch: str) -> bool:
        current = self.progress
        return (
            current is not None and epoch == self.epoch and progress.seq <= current.seq
        )
