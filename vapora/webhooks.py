"""Outgoing webhooks: signed POSTs on status changes, retried, never in the way.

The store's listener only puts a delivery on a bounded queue; workers send it
with a timeout and retry with exponential backoff, and every outcome is
recorded. A slow or failing endpoint delays other webhooks at worst, never the
updates to pages. On a clean stop, the deliveries still queued or between two
attempts are saved as pending, and the next start takes them up again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from .errors import InvalidInput, NotFound
from .model import Status, utc_now
from .settings import Settings
from .store import Change, Store
from .validate import excerpt

logger = logging.getLogger(__name__)

EVENTS = ("completed", "failed", "waiting", "stalled")
MAX_URL_CHARS = 2000
QUEUE_LIMIT = 10_000
WORKERS = 4
# With several nodes, how soon one hears of a webhook added or removed on another.
CLUSTER_RELOAD_S = 2.0


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    url: str
    secret: str
    events: tuple[str, ...]
    created_at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    webhook: Webhook
    event: str
    change: Change
    tried: int = 0  # attempts made before a restart


def event_of(change: Change) -> str | None:
    """Name the webhook event a change raises, if any."""
    if change.kind == "stalled":
        return "stalled"
    if change.status is Status.WAITING and change.kind in ("advanced", "approved"):
        return "waiting"  # a gate waits, even right after another
    if change.status is change.previous_status:
        return None
    if change.status in (Status.COMPLETED, Status.FAILED, Status.WAITING):
        return change.status.value
    return None


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def clean_url(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS:
        raise InvalidInput(
            "url", f"url must be text of at most {MAX_URL_CHARS} characters"
        )
    try:
        url = URL(value.strip())
        host = url.host
    except ValueError as error:
        # yarl refuses a malformed address, such as an unclosed IPv6 bracket.
        raise InvalidInput("url", f"url is not a valid address: {error}") from None
    if url.scheme not in ("http", "https") or not host:
        raise InvalidInput("url", "url must be an absolute http or https address")
    return str(url)


def clean_events(value: Any) -> tuple[str, ...]:
    if value is None:
        return EVENTS
    if not isinstance(value, list) or not value or any(e not in EVENTS for e in value):
        raise InvalidInput(
            "events", f"events must be a list drawn from {', '.join(EVENTS)}"
        )
    return tuple(dict.fromkeys(value))


class Webhooks:
    """Keeps the webhooks, queues deliveries for changes and sends them."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._hooks: list[Webhook] = []
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(QUEUE_LIMIT)
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        # Deliveries being sent, with the attempts made so far.
        self._sending: dict[Delivery, int] = {}

    async def start(self, reload_every_s: float | None = None) -> None:
        """Load the webhooks and start sending; reload now and then if asked."""
        await self._reload()
        await self._take_up_pending()
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]
        if reload_every_s is not None:
            reloads = self._reload_forever(reload_every_s)
            self._workers.append(asyncio.create_task(reloads))

    async def stop(self) -> None:
        """Stop sending; save what is left as pending, for the next start."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        left = dict(self._sending)
        while not self._queue.empty():
            left.setdefault(self._queue.get_nowait(), 0)
        for delivery, tried in left.items():
            await self._record(delivery, tried, "pending", "saved at shutdown")
        if left:
            logger.info("Saved %d webhook deliveries for the next start", len(left))

    async def _take_up_pending(self) -> None:
        """Queue the deliveries a clean stop saved; each is taken by one node."""
        rows = await self.store.fetch_all(
            "SELECT d.id, d.webhook_id, d.seq, d.event, d.attempts, e.payload "
            "FROM webhook_deliveries d JOIN events e "
            "ON e.workflow_id = d.workflow_id AND e.seq = d.seq "
            "WHERE d.outcome = 'pending' ORDER BY d.id"
        )
        hooks = {hook.id: hook for hook in self._hooks}
        for row in rows:
            claimed = await self.store.execute(
                "DELETE FROM webhook_deliveries WHERE id = ? AND outcome = 'pending'",
                (row["id"],),
            )
            hook = hooks.get(row["webhook_id"])
            if not claimed or hook is None:
                continue
            state = json.loads(row["payload"])
            change = Change(
                state["workflow_id"],
                row["seq"],
                row["payload"],
                Status(state["status"]),
                time.monotonic(),
                state["kind"],
            )
            self._queue.put_nowait(Delivery(hook, row["event"], change, row[4]))

    # -- the webhooks themselves -------------------------------------------------

    async def create(self, url: Any, events: Any) -> Webhook:
        """Add a webhook; its secret signs every delivery. 400 names a bad field."""
        hook = Webhook(
            secrets.token_urlsafe(6),
            clean_url(url),
            "whsec_" + secrets.token_urlsafe(24),
            clean_events(events),
            utc_now(),
        )
        await self.store.execute(
            "INSERT INTO webhooks (id, url, secret, events, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (hook.id, hook.url, hook.secret, json.dumps(hook.events), hook.created_at),
        )
        await self._reload()
        return hook

    async def delete(self, webhook_id: str) -> None:
        if not await self.store.execute(
            "DELETE FROM webhooks WHERE id = ?", (webhook_id,)
        ):
            raise NotFound(
                "webhook_id", f"no webhook with id {excerpt(webhook_id, 40)}"
            )
        await self._reload()

    def all(self) -> list[Webhook]:
        return list(self._hooks)

    async def deliveries(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self.store.fetch_all(
            "SELECT webhook_id, workflow_id, seq, event, attempts, outcome, detail, at "
            "FROM webhook_deliveries ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [dict(row) for row in rows]

    async def _reload(self) -> None:
        rows = await self.store.fetch_all(
            "SELECT id, url, secret, events, created_at FROM webhooks "
            "ORDER BY created_at"
        )
        self._hooks = [
            Webhook(
                r["id"], r["url"], r["secret"], tuple(json.loads(r["events"])), r[4]
            )
            for r in rows
        ]

    async def _reload_forever(self, interval_s: float) -> None:
        """Follow what other nodes add and remove; each sends for its own changes."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._reload()
            except Exception as error:
                logger.warning("Could not reload the webhooks: %s", error)

    # -- deliveries ------------------------------------------------------------------

    def on_change(self, change: Change) -> None:
        """Queue a delivery per interested webhook; never waits."""
        event = event_of(change)
        if event is None:
            return
        for hook in self._hooks:
            if event in hook.events:
                try:
                    self._queue.put_nowait(Delivery(hook, event, change))
                except asyncio.QueueFull:
                    logger.warning(
                        "Webhook queue full; dropped %s for %s", event, hook.url
                    )

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except Exception:
                logger.exception("Webhook delivery to %s failed", delivery.webhook.url)
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: Delivery) -> None:
        hook, change = delivery.webhook, delivery.change
        head = json.dumps({"event": delivery.event, "seq": change.seq})
        body = (head[:-1] + ',"workflow":' + change.payload + "}").encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Vapora",
            "X-Vapora-Event": delivery.event,
            "X-Vapora-Delivery": f"{change.workflow_id}:{change.seq}:{hook.id}",
            "X-Vapora-Signature": sign(hook.secret, body),
        }
        attempts = self.settings.webhook_attempts
        detail = "no attempt left after a restart"
        # Until it is done, stop() finds it here, even when cancelled mid-wait.
        self._sending[delivery] = delivery.tried
        for attempt in range(delivery.tried + 1, attempts + 1):
            detail = await self._post(hook.url, body, headers)
            self._sending[delivery] = attempt
            if detail.startswith("2"):
                del self._sending[delivery]
                await self._record(delivery, attempt, "delivered", detail)
                return
            if attempt < attempts:
                backoff = self.settings.webhook_retry_base_s * 2 ** (attempt - 1)
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
        del self._sending[delivery]
        logger.warning(
            "Webhook %s gave up on %s after %d attempts: %s",
            hook.url,
            delivery.event,
            attempts,
            detail,
        )
        await self._record(delivery, attempts, "failed", detail)

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> str:
        """POST once; return the status code, or what went wrong, as text."""
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                return f"{response.status} {response.reason or ''}".strip()
        except TimeoutError:
            return f"no answer within {self.settings.webhook_timeout_s:g} s"
        except aiohttp.ClientError as error:
            return f"{type(error).__name__}: {error}"

    async def _record(
        self, delivery: Delivery, attempts: int, outcome: str, detail: str
    ) -> None:
        await self.store.execute(
            "INSERT INTO webhook_deliveries (webhook_id, workflow_id, seq, event, "
            "attempts, outcome, detail, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                delivery.webhook.id,
                delivery.change.workflow_id,
                delivery.change.seq,
                delivery.event,
                attempts,
                outcome,
                detail[:500],
                utc_now(),
            ),
        )
