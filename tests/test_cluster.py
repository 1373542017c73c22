"""Several `vapora serve` processes on one database, passing changes through Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from vapora.app import create_app
from vapora.settings import Settings
from vapora.store import Store

from .conftest import (
    AUTH,
    ClientFactory,
    RedisServer,
    ServerProcess,
    make_settings,
    unused_port,
)
from .test_delivery import ResumingClient
from .test_watchers import Receiver, presence_counts

StartServer = Callable[..., ServerProcess]

# Frequent heartbeats let a client notice at once that it has reached its target.
NODE_ENV = {"VAPORA_HEARTBEAT_S": "0.5"}


def start_node(start: StartServer, db: str, broker: str) -> ServerProcess:
    return start("--db", db, "--broker", broker, env=NODE_ENV)


@asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


async def post(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with client.post(url, json=body, headers=AUTH) as response:
        assert response.status in (200, 201), await response.text()
        return dict(await response.json())


async def create(client: aiohttp.ClientSession, node: ServerProcess) -> str:
    steps = [f"step {i}" for i in range(5)]
    workflow = await post(
        client, f"{node.url}/api/workflows", {"name": "n", "steps": steps}
    )
    return str(workflow["workflow_id"])


async def say(
    client: aiohttp.ClientSession, node: ServerProcess, wid: str, text: str
) -> int:
    """Set the workflow's message through node; return the acknowledged seq."""
    url = f"{node.url}/api/workflows/{wid}/message"
    return int((await post(client, url, {"message": text}))["seq"])


async def current_seq(
    client: aiohttp.ClientSession, node: ServerProcess, wid: str
) -> int:
    async with client.get(f"{node.url}/api/workflows/{wid}") as response:
        return int((await response.json())["seq"])


async def readiness(
    client: aiohttp.ClientSession, node: ServerProcess
) -> tuple[int, dict[str, Any]]:
    async with client.get(f"{node.url}/readyz") as response:
        return response.status, dict(await response.json())


async def wait_for_readiness(
    client: aiohttp.ClientSession, node: ServerProcess, status: int
) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while True:
            got, body = await readiness(client, node)
            if got == status:
                return body
            await asyncio.sleep(0.05)


async def watch(
    client: aiohttp.ClientSession, nodes: list[ServerProcess], wid: str, each: int
) -> tuple[list[ResumingClient], list[asyncio.Task[None]]]:
    """Open `each` resuming sockets on every node; return once all have a snapshot."""
    watchers = [
        ResumingClient(client, f"{node.url}/api/workflows/{wid}/updates")
        for node in nodes
        for _ in range(each)
    ]
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    async with asyncio.timeout(10):
        while any(w.epoch == "" for w in watchers):
            await asyncio.sleep(0.02)
    return watchers, tasks


async def until_everyone_has(
    watchers: list[ResumingClient], tasks: list[asyncio.Task[None]], seq: int
) -> None:
    for w in watchers:
        w.target = seq
    async with asyncio.timeout(20):
        await asyncio.gather(*tasks)


def updates(w: ResumingClient) -> list[Any]:
    return [frame for frame in w.log if frame[0] not in ("heartbeat", "presence")]


async def test_a_change_made_through_one_node_reaches_a_subscriber_of_another(
    server_process: StartServer, postgres_url: str, redis_url: str
) -> None:
    a = start_node(server_process, postgres_url, redis_url)
    b = start_node(server_process, postgres_url, redis_url)
    async with session() as client:
        assert (await readiness(client, a))[0] == 200
        assert (await readiness(client, b))[0] == 200
        wid = await create(client, b)

        async with client.ws_connect(f"{a.url}/api/workflows/{wid}/updates") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
            await say(client, b, wid, "made on B")
            frame = await ws.receive_json(timeout=5)
            while frame["type"] != "update":
                frame = await ws.receive_json(timeout=5)

    assert (frame["seq"], frame["message"]) == (2, "made on B")


async def test_cutting_the_broker_link_mid_burst_loses_nothing_for_any_subscriber(
    server_process: StartServer, postgres_url: str, redis_url: str
) -> None:
    nodes = [start_node(server_process, postgres_url, redis_url) for _ in range(2)]
    total, lanes = 240, 4
    async with session() as client, aioredis.Redis.from_url(redis_url) as redis:
        wid = await create(client, nodes[0])
        watchers, tasks = await watch(client, nodes, wid, each=10)
        acknowledged: list[int] = []
        killed: list[int] = []

        async def lane(first: int) -> None:
            for i in range(first, total, lanes):
                acknowledged.append(await say(client, nodes[i % 2], wid, f"m{i}"))
                if len(acknowledged) == total // 2:
                    killed.append(await redis.client_kill_filter(_type="pubsub"))

        await asyncio.gather(*(lane(k) for k in range(lanes)))
        await until_everyone_has(watchers, tasks, total + 1)

    assert killed[0] >= 2
    assert sorted(acknowledged) == list(range(2, total + 2))
    for w in watchers:
        assert w.seen == list(range(2, total + 2)), f"a gap or a repeat: {updates(w)}"
    for node in nodes:
        assert any("reconnecting" in line for line in node.log), "".join(node.log)


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"]
)
async def test_clients_of_a_stopped_node_resume_on_another_and_lose_nothing(
    server_process: StartServer, postgres_url: str, redis_url: str, sig: int
) -> None:
    a = start_node(server_process, postgres_url, redis_url)
    b = start_node(server_process, postgres_url, redis_url)
    total = 120
    async with session() as client:
        wid = await create(client, b)
        watchers, tasks = await watch(client, [a], wid, each=20)
        acknowledged: dict[int, str] = {}
        a_is_gone = asyncio.Event()

        async def lane(first: int) -> None:
            for i in range(first, total, 2):
                node = b if i % 2 or a_is_gone.is_set() else a
                try:
                    acknowledged[await say(client, node, wid, f"m{i}")] = f"m{i}"
                except aiohttp.ClientError:
                    pass  # never acknowledged, so it may or may not have happened

        lanes = [asyncio.create_task(lane(first)) for first in (0, 1)]
        while len(acknowledged) < total // 2:
            await asyncio.sleep(0.005)
        # Stopped with writes in flight; a balancer sends what follows to B.
        a.proc.send_signal(sig)
        a_is_gone.set()
        await asyncio.to_thread(a.proc.wait, 10)
        for w in watchers:
            w.url = w.url.replace(a.url, b.url)
        await asyncio.gather(*lanes)
        final = await current_seq(client, b, wid)
        await until_everyone_has(watchers, tasks, final)
        async with client.get(f"{b.url}/api/workflows/{wid}/history") as response:
            events = (await response.json())["events"]

    assert len(acknowledged) >= total - 2
    logged = {e["seq"]: e["summary"] for e in events}
    for seq, text in acknowledged.items():
        assert logged[seq] == f"Message: {text}"
    for w in watchers:
        assert w.reconnected_at, "every client moved to the other node"
        assert w.seen == list(range(2, final + 1)), f"a gap or a repeat: {updates(w)}"


async def test_two_processes_share_one_sqlite_file_through_the_broker(
    server_process: StartServer, redis_url: str, tmp_path: Path
) -> None:
    db = tmp_path / "shared.db"
    nodes = [
        server_process("--broker", redis_url, db=db, env=NODE_ENV) for _ in range(2)
    ]
    total, lanes = 200, 4
    async with session() as client:
        wid = await create(client, nodes[0])
        watchers, tasks = await watch(client, nodes, wid, each=5)

        async def lane(first: int) -> None:
            for i in range(first, total, lanes):
                await say(client, nodes[i % 2], wid, f"m{i}")

        await asyncio.gather(*(lane(k) for k in range(lanes)))
        final = await current_seq(client, nodes[1], wid)
        await until_everyone_has(watchers, tasks, total + 1)

    assert final == total + 1
    for w in watchers:
        assert w.seen == list(range(2, total + 2)), f"a gap or a repeat: {updates(w)}"


async def test_a_change_whose_node_died_before_publishing_it_still_arrives(
    server_process: StartServer, redis_url: str, tmp_path: Path
) -> None:
    db = tmp_path / "shared.db"
    node = server_process("--broker", redis_url, db=db, env=NODE_ENV)
    # Another node's store, which commits and never publishes: as if that node
    # died between the two.
    silent = Store(db)
    await silent.open()
    try:
        async with session() as client:
            wid = await create(client, node)
            url = f"{node.url}/api/workflows/{wid}/updates"
            async with client.ws_connect(url) as ws:
                assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
                await silent.set_message(wid, "never published", "other node")
                async with asyncio.timeout(10):
                    frame = await ws.receive_json()
                    while frame["type"] != "update":
                        frame = await ws.receive_json()
    finally:
        await silent.close()

    assert (frame["seq"], frame["message"]) == (2, "never published")


async def test_a_node_without_its_broker_is_not_ready_and_catches_up_on_its_return(
    server_process: StartServer, postgres_url: str, redis_server: RedisServer
) -> None:
    a = start_node(server_process, postgres_url, redis_server.url)
    b = start_node(server_process, postgres_url, redis_server.url)
    async with session() as client:
        wid = await create(client, b)
        watchers, tasks = await watch(client, [a], wid, each=3)

        redis_server.stop()
        body = await wait_for_readiness(client, a, 503)
        for i in range(5):
            await say(client, b, wid, f"while the broker is away {i}")
        await asyncio.sleep(0.5)
        away = [list(w.seen) for w in watchers]
        redis_server.start()
        await wait_for_readiness(client, a, 200)
        started = time.monotonic()
        await until_everyone_has(watchers, tasks, 6)
        caught_up_s = time.monotonic() - started

    assert "broker" in body["reason"], body
    assert any("WARNING" in line and "broker" in line for line in a.log)
    assert away == [[]] * 3, "nothing can come while the broker is away"
    for w in watchers:
        assert w.seen == list(range(2, 7)), f"a gap or a repeat: {updates(w)}"
    print(f"\ncaught up {caught_up_s:.2f} s after the broker came back")


async def test_a_node_whose_broker_cannot_be_reached_starts_but_is_not_ready(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    broker = f"redis://:secret@127.0.0.1:{unused_port()}/0"
    client = await aiohttp_client(create_app(make_settings(tmp_path, broker=broker)))

    response = await client.get("/readyz")

    assert response.status == 503
    reason = (await response.json())["reason"]
    assert "broker" in reason and "secret" not in reason


def test_a_broker_must_be_a_redis_url_and_its_password_is_never_shown() -> None:
    with pytest.raises(ValueError, match="broker"):
        Settings(broker="http://127.0.0.1:6379").check()

    shown = Settings(
        db="postgresql://vapora:pw1@db/vapora", broker="redis://:pw2@cache:6379/0"
    ).public_items()

    assert (shown["db"], shown["broker"]) == (
        "postgresql://vapora:***@db/vapora",
        "redis://:***@cache:6379/0",
    )


async def test_a_webhook_added_through_one_node_is_sent_by_another(
    server_process: StartServer, redis_url: str, tmp_path: Path
) -> None:
    nodes = [
        server_process("--broker", redis_url, db=tmp_path / "shared.db", env=NODE_ENV)
        for _ in range(2)
    ]
    receiver = Receiver()
    server = await receiver.start()
    async with session() as client:
        hook = await post(
            client,
            f"{nodes[0].url}/api/webhooks",
            {"url": str(server.make_url("/hook")), "events": ["completed"]},
        )
        async with asyncio.timeout(10):
            while hook["id"] not in await webhook_ids(client, nodes[1]):
                await asyncio.sleep(0.05)
        wid = await create(client, nodes[1])

        await post(
            client,
            f"{nodes[1].url}/api/workflows/{wid}/status",
            {"status": "completed"},
        )
        async with asyncio.timeout(10):
            await receiver.arrived.wait()

    headers, _ = receiver.bodies[0]
    assert headers["X-Vapora-Delivery"].endswith(f":{hook['id']}")
    await server.close()


async def webhook_ids(client: aiohttp.ClientSession, node: ServerProcess) -> set[str]:
    async with client.get(f"{node.url}/api/webhooks", headers=AUTH) as response:
        return {h["id"] for h in (await response.json())["webhooks"]}


async def test_every_node_counts_the_watchers_of_all_nodes(
    server_process: StartServer, redis_url: str, tmp_path: Path
) -> None:
    env = dict(NODE_ENV, VAPORA_PRESENCE_INTERVAL_S="0.05")
    a, b = (
        server_process("--broker", redis_url, db=tmp_path / "shared.db", env=env)
        for _ in range(2)
    )
    async with session() as client:
        wid = await create(client, a)
        path = f"/api/workflows/{wid}/updates"
        here = await client.ws_connect(a.url + path)
        there = [await client.ws_connect(b.url + path) for _ in range(2)]

        async with asyncio.timeout(30):
            with_both = await presence_counts(here, wid, until=3)
            async with client.get(f"{b.url}/workflows/{wid}") as response:
                page = await response.text()
            await there[0].close()
            one_left = await presence_counts(here, wid, until=2)
            b.stop(signal.SIGKILL)
            b_gone = await presence_counts(here, wid, until=1)
        await here.close()

    assert with_both[-1] == 3 and one_left[-1] == 2 and b_gone[-1] == 1
    assert '<span data-field="watching">3</span> watching now' in page
