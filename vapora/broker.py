"""The broker: committed changes passed between Vapora nodes through Redis.

Each node publishes its own commits on one Redis channel, named after the
database's epoch so that clusters on other databases never mix, and hands
what it hears from the other nodes to its sequencer, which delivers each
workflow's changes in order and fills any gap from the store. Each node also
tells the others, every second, how many watch each workflow through it, so
that every page counts all the watchers. Redis keeps nothing for a node that
is away, so losing it is never silent: the node reports not ready, logs a
warning, reconnects with backoff, and once back catches every watched workflow
up from the store and sends what it could not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections import Counter, deque

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .hub import Hub
from .model import Status
from .sequencer import Sequencer
from .settings import hide_password
from .store import Change, Store

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
FIRST_CONNECT_WAIT_S = 3.0
# A link silent this long is pinged; one silent for three times as long is dead.
PING_AFTER_S = 2.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
STOP_FLUSH_S = 1.0
PUBLISH_BATCH = 500
# Past this many changes waiting to be sent, only each workflow's latest is
# kept: the other nodes read the ones before it from the store.
OUTBOX_LIMIT = 10_000
# How often the watched workflows are compared with the store, for changes a
# node committed and died before publishing.
SWEEP_S = 2.0
# How often each node tells the others how many watch each workflow through it;
# a node not heard from for three times as long counts no watchers.
SHARE_WATCHERS_S = 1.0


def encode(node: str, change: Change) -> bytes:
    """One line naming the node, the workflow, the seq, status and kind; the payload."""
    head = f"{node} {change.workflow_id} {change.seq} {change.status} {change.kind}"
    return f"{head}\n{change.payload}".encode()


def decode(data: bytes) -> tuple[str, Change]:
    """Return the sending node and its change; ValueError if data is not one."""
    head, _, payload = data.decode().partition("\n")
    node, workflow_id, seq, status, kind = head.split(" ")
    change = Change(
        workflow_id, int(seq), payload, Status(status), time.monotonic(), kind
    )
    return node, change


async def end(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them to finish.

    The Redis client may swallow a cancellation that lands in the middle of
    a command, so each task is cancelled again until it is done.
    """
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # seen: the link's end was already reported


class BrokerLost(ConnectionError):
    """The link to Redis stopped answering without being closed."""


class Broker:
    """This node's link to the others: publishes its commits, takes theirs."""

    def __init__(self, url: str, store: Store, hub: Hub) -> None:
        self.url = url
        self.store = store
        self.hub = hub
        self.node = secrets.token_hex(6)
        self.sequencer = Sequencer(store, hub)
        # Why this node is not ready, or None while the link is up.
        self.problem: str | None = "not connected to the broker yet"
        self._outbox: deque[Change] = deque()
        self._wake = asyncio.Event()
        self._up = asyncio.Event()
        self._tried = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Each other node's watchers by workflow, and when it last said so.
        self._watchers: dict[str, tuple[dict[str, int], float]] = {}

    @property
    def channel(self) -> str:
        return f"vapora:{self.store.epoch}:changes"

    @property
    def watchers_channel(self) -> str:
        return f"vapora:{self.store.epoch}:watchers"

    def on_commit(self, change: Change) -> None:
        """Deliver a local commit here at once, and queue it for the other nodes."""
        self.sequencer.offer(change)
        self._outbox.append(change)
        if len(self._outbox) > OUTBOX_LIMIT:
            latest = {c.workflow_id: c for c in self._outbox}
            self._outbox = deque(sorted(latest.values(), key=lambda c: c.committed_at))
        self._wake.set()

    async def start(self) -> None:
        """Connect in the background, after waiting for the first try's outcome."""
        self._task = asyncio.create_task(self._run())
        self._sweeper = asyncio.create_task(self.sequencer.sweep_forever(SWEEP_S))
        try:
            await asyncio.wait_for(self._tried.wait(), FIRST_CONNECT_WAIT_S)
        except TimeoutError:
            pass  # _run goes on trying, and says why it cannot connect

    async def stop(self) -> None:
        """Send what is queued if the link is up, then disconnect."""
        deadline = time.monotonic() + STOP_FLUSH_S
        while self._outbox and self._up.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await end([t for t in (self._task, self._sweeper) if t is not None])
        self.sequencer.stop()

    async def _run(self) -> None:
        failures = 0
        where = hide_password(self.url)
        while True:
            try:
                await self._serve()
                reason = f"broker {where} ended the link"
            except (RedisError, OSError) as error:
                why = str(error) or type(error).__name__
                reason = f"broker {where} unreachable: {why}"
            except Exception as error:
                logger.exception("The link to the broker failed")
                reason = f"broker link failed: {error!r}"
            if self._up.is_set() or failures == 0:
                logger.warning("%s; reconnecting", reason)
                failures = 0
            self._up.clear()
            self._tried.set()
            self.problem = reason
            failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))
            await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _serve(self) -> None:
        """Connect, then listen and publish until the link fails."""
        client = aioredis.Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            client_name="vapora",
        )
        pubsub = client.pubsub()
        tasks: list[asyncio.Task[None]] = []
        try:
            await pubsub.subscribe(self.channel, self.watchers_channel)
            await client.ping()
            was_down = self.problem
            self.problem = None
            self._up.set()
            self._tried.set()
            logger.info("Connected to the broker %s", hide_password(self.url))
            if was_down is not None:
                # Nothing said after the subscription is missed; what was said
                # before it is in the store.
                self.sequencer.catch_up()
            tasks = [
                asyncio.create_task(self._listen(pubsub)),
                asyncio.create_task(self._publish(client)),
                asyncio.create_task(self._share_watchers(client)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            await end(tasks)
            await asyncio.gather(
                pubsub.aclose(), client.aclose(), return_exceptions=True
            )
            # Cut off from the others, this node can vouch for its own only.
            self._watchers.clear()
            self.hub.set_elsewhere({})

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = pinged = loop.time()
        watchers_channel = self.watchers_channel.encode()
        while True:
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=PING_AFTER_S / 2
            )
            now = loop.time()
            if message is None:
                if now - heard > 3 * PING_AFTER_S:
                    raise BrokerLost("no answer to pings")
                if now - heard > PING_AFTER_S and now - pinged > PING_AFTER_S:
                    await pubsub.ping()
                    pinged = now
                continue
            heard = now
            if message["type"] != "message":
                continue
            if message["channel"] == watchers_channel:
                self._take_watchers(message["data"], now)
                continue
            try:
                node, change = decode(message["data"])
            except ValueError:
                logger.warning("Ignoring a malformed message on %s", self.channel)
                continue
            if node != self.node:
                self.sequencer.offer(change)

    async def _share_watchers(self, client: aioredis.Redis) -> None:
        """Say how many watch through this node; forget nodes gone silent."""
        loop = asyncio.get_running_loop()
        while True:
            counts = self.hub.watched_here()
            await client.publish(
                self.watchers_channel, f"{self.node} {json.dumps(counts)}"
            )
            silent = loop.time() - 3 * SHARE_WATCHERS_S
            gone = [n for n, (_, at) in self._watchers.items() if at < silent]
            if gone:
                for node in gone:
                    del self._watchers[node]
                self._count_elsewhere()
            await asyncio.sleep(SHARE_WATCHERS_S)

    def _take_watchers(self, data: bytes, now: float) -> None:
        try:
            node, _, text = data.decode().partition(" ")
            counts = json.loads(text)
            if not isinstance(counts, dict) or not all(
                type(n) is int for n in counts.values()
            ):
                raise ValueError("not counts")
        except ValueError:
            logger.warning("Ignoring a malformed message on %s", self.watchers_channel)
            return
        if node != self.node:
            self._watchers[node] = (counts, now)
            self._count_elsewhere()

    def _count_elsewhere(self) -> None:
        total: Counter[str] = Counter()
        for counts, _ in self._watchers.values():
            total.update(counts)
        self.hub.set_elsewhere(dict(total))

    async def _publish(self, client: aioredis.Redis) -> None:
        while True:
            while not self._outbox:
                self._wake.clear()
                await self._wake.wait()
            batch = [
                self._outbox.popleft()
                for _ in range(min(PUBLISH_BATCH, len(self._outbox)))
            ]
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for change in batch:
                        pipe.publish(self.channel, encode(self.node, change))
                    await pipe.execute()
            except BaseException:
                # Sent again after reconnecting; the other nodes drop repeats.
                self._outbox.extendleft(reversed(batch))
                raise
