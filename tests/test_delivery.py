"""Nothing lost, repeated or reordered: resume, slow readers, restarts, SSE."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from vapora.app_keys import HUB

from .conftest import AUTH, ServerProcess, create_workflow
from .test_cli import free_port
from .test_ws import advance, frames_until, set_message


async def test_client_cut_off_while_ten_changes_land_gets_all_ten_once_in_order(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=12)
    wid = wf["workflow_id"]
    async with client.ws_connect(f"/api/workflows/{wid}/updates") as ws:
        snapshot = await ws.receive_json(timeout=5)
    seq, epoch = snapshot["seq"], snapshot["epoch"]

    for i in range(10):
        await advance(client, wid, f"while away {i}")
    async with client.ws_connect(
        f"/api/workflows/{wid}/updates?after={seq}&epoch={epoch}"
    ) as ws:
        frames = await frames_until(ws, seq + 10)
        await advance(client, wid, "live again")
        live = await frames_until(ws, seq + 11)

    assert [f["type"] for f in frames] == ["update"] * 10
    assert [f["seq"] for f in frames] == list(range(seq + 1, seq + 11))
    assert [f["message"] for f in frames] == [f"while away {i}" for i in range(10)]
    assert [f["seq"] for f in live] == [seq + 11]


async def test_change_between_page_render_and_socket_open_reaches_the_page(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    wid = wf["workflow_id"]
    html = await (await client.get(f"/workflows/{wid}")).text()
    seq = re.search(r'data-seq="(\d+)"', html)
    epoch = re.search(r'data-epoch="(\w+)"', html)
    assert seq and epoch

    await set_message(client, wid, "committed before the socket opened")
    async with client.ws_connect(
        f"/api/workflows/{wid}/updates?after={seq[1]}&epoch={epoch[1]}"
    ) as ws:
        first = await ws.receive_json(timeout=5)

    assert first["type"] == "update"
    assert first["seq"] == int(seq[1]) + 1
    assert first["message"] == "committed before the socket opened"


async def test_resume_that_is_up_to_date_gets_only_what_comes_next(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    wid = wf["workflow_id"]
    epoch = client.app[HUB].epoch

    async with client.ws_connect(
        f"/api/workflows/{wid}/updates?after=1&epoch={epoch}"
    ) as ws:
        await set_message(client, wid, "next")
        frames = await frames_until(ws, 2)

    assert [(f["type"], f["seq"]) for f in frames] == [("update", 2)]


async def test_gap_longer_than_the_bound_gets_a_fresh_snapshot(
    app_factory: Any,
) -> None:
    client = await app_factory(max_resume_events=5)
    wf = await create_workflow(client, steps=10)
    wid = wf["workflow_id"]
    for _ in range(8):
        await advance(client, wid)
    epoch = client.app[HUB].epoch

    async with client.ws_connect(
        f"/api/workflows/{wid}/updates?after=1&epoch={epoch}"
    ) as ws:
        first = await ws.receive_json(timeout=5)

    assert first["type"] == "snapshot"
    assert first["reason"] == "resync"
    assert first["seq"] == 9


async def test_resume_against_another_database_resyncs(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    wid = wf["workflow_id"]

    async with client.ws_connect(
        f"/api/workflows/{wid}/updates?after=40&epoch=0123456789abcdef"
    ) as ws:
        first = await ws.receive_json(timeout=5)

    assert (first["type"], first["reason"], first["seq"]) == ("snapshot", "resync", 1)
    assert first["epoch"] == client.app[HUB].epoch


async def test_resume_from_a_seq_the_server_never_had_resyncs(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    epoch = client.app[HUB].epoch

    async with client.ws_connect(
        f"/api/workflows/{wf['workflow_id']}/updates?after=99&epoch={epoch}"
    ) as ws:
        first = await ws.receive_json(timeout=5)

    assert (first["type"], first["reason"], first["seq"]) == ("snapshot", "resync", 1)


async def test_bad_after_is_a_400(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client)

    response = await client.get(f"/api/workflows/{wf['workflow_id']}/updates?after=-3")

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "after"


# -- slow readers --------------------------------------------------------------


def open_stuck_reader(url: str, path: str) -> socket.socket:
    """Do a WebSocket handshake on a socket with a tiny buffer, then never read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match[1])


async def test_reader_that_never_reads_delays_no_one_and_costs_bounded_memory(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process(
        env={"VAPORA_STUCK_TIMEOUT_S": "3", "VAPORA_MAX_QUEUE_BYTES": "65536"}
    )
    message = "x" * 1500
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.url}/api/workflows",
            json={"name": "busy", "steps": ["a", "b"]},
            headers=AUTH,
        ) as response:
            wid = (await response.json())["workflow_id"]
        stuck = open_stuck_reader(server.url, f"/api/workflows/{wid}/updates")
        reader = await session.ws_connect(f"{server.url}/api/workflows/{wid}/updates")
        await reader.receive_json(timeout=5)
        rss_before = rss_kib(server.proc.pid)

        received: list[int] = []

        async def read_all() -> None:
            while not received or received[-1] < 1001:
                frame = await reader.receive_json(timeout=10)
                if frame["type"] == "update":
                    received.append(frame["seq"])

        reading = asyncio.create_task(read_all())
        for i in range(1000):
            async with session.post(
                f"{server.url}/api/workflows/{wid}/message",
                json={"message": f"{i} {message}"},
                headers=AUTH,
            ) as response:
                assert response.status == 200
        await reading
        rss_after = rss_kib(server.proc.pid)
        await reader.close()

    assert received == list(range(2, 1002))
    # 1,000 updates of ~2 KB are 2 MB; the stuck socket may hold only its queue.
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)
    print(f"\nserver RSS with one stuck reader: {rss_before} KiB -> {rss_after} KiB")

    await asyncio.to_thread(wait_for_log, server, "took no data", 15)
    stuck.setblocking(False)
    stuck.close()


def wait_for_log(server: ServerProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in server.log):
        assert time.monotonic() < deadline, f"no log line with {text!r}"
        time.sleep(0.05)


async def test_slow_subscriber_catches_up_from_the_latest_state(
    app_factory: Any,
) -> None:
    client = await app_factory(max_queue_bytes=4096, stuck_timeout_s=30)
    wf = await create_workflow(client, steps=3)
    wid = wf["workflow_id"]
    ws = await client.ws_connect(f"/api/workflows/{wid}/updates")
    await ws.receive_json(timeout=5)
    assert (await ws.receive_json(timeout=5))["type"] == "ready"
    sub = next(iter(client.app[HUB]._groups[wid]))
    sub.protocol.pause_writing()  # as the transport does when its buffer is full

    await set_message(client, wid, "skipped 1")
    await set_message(client, wid, "skipped 2")
    await advance(client, wid, "the latest")
    sub.protocol.resume_writing()
    caught_up = await ws.receive_json(timeout=5)

    assert caught_up["type"] == "snapshot"
    assert caught_up["reason"] == "collapsed"
    assert (caught_up["seq"], caught_up["message"]) == (4, "the latest")
    assert (await ws.receive_json(timeout=5))["type"] == "ready"
    await advance(client, wid, "live again")
    assert (await ws.receive_json(timeout=5))["seq"] == 5
    await ws.close()


# -- restarts ---------------------------------------------------------------------


class ResumingClient:
    """A subscriber that reconnects with jittered backoff and resumes from its seq."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.seq = 0
        self.epoch = ""
        self.seen: list[int] = []
        self.reconnected_at: list[float] = []
        self.target = 0
        self.done = asyncio.Event()
        self.log: list[Any] = []

    async def run(self) -> None:
        attempt = 0
        while not self.done.is_set():
            query = f"?after={self.seq}&epoch={self.epoch}" if self.epoch else ""
            try:
                async with self.session.ws_connect(self.url + query) as ws:
                    self.log.append(("connect", query))
                    if self.epoch:
                        self.reconnected_at.append(time.monotonic())
                    attempt = 0
                    async for msg in ws:
                        self.take(msg.json())
                        if self.seq >= self.target > 0:
                            self.done.set()
                            return
            except aiohttp.ClientError:
                pass
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(5.0, 0.1 * 2**attempt)))

    def take(self, frame: dict[str, Any]) -> None:
        self.log.append((frame["type"], frame.get("seq")))
        if frame["type"] == "snapshot":
            self.epoch = frame["epoch"]
            self.seq = frame["seq"]
        elif frame["type"] == "update":
            self.seen.append(frame["seq"])
            self.seq = frame["seq"]


async def test_200_sockets_across_a_restart_end_at_the_latest_seq_without_gaps(
    server_process: Any, tmp_path: Path
) -> None:
    port = free_port()
    db = tmp_path / "restart.db"
    server: ServerProcess = server_process("--port", str(port), db=db)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(
            f"{server.url}/api/workflows",
            json={"name": "r", "steps": ["a"]},
            headers=AUTH,
        ) as response:
            wid = (await response.json())["workflow_id"]
        url = f"{server.url}/api/workflows/{wid}/updates"
        clients = [ResumingClient(session, url) for _ in range(200)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        async with asyncio.timeout(20):
            while any(c.epoch == "" for c in clients):
                await asyncio.sleep(0.02)

        async def post_messages(base: str, first: int) -> None:
            for i in range(first, first + 20):
                async with session.post(
                    f"{base}/api/workflows/{wid}/message",
                    json={"message": f"m{i}"},
                    headers=AUTH,
                ) as response:
                    assert response.status == 200

        await post_messages(server.url, 0)
        assert await asyncio.to_thread(server.stop) == 0
        restarted_at = time.monotonic()
        again: ServerProcess = server_process("--port", str(port), db=db)
        await post_messages(again.url, 20)
        for c in clients:
            c.target = 41
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)

    for c in clients:
        assert c.seq == 41
        frames = [x for x in c.log if x[0] != "heartbeat"]
        assert c.seen == list(range(2, 42)), f"a gap or a duplicate: {frames}"
    first_returns = [c.reconnected_at[0] - restarted_at for c in clients]
    print(
        f"\nreconnect spread after restart: {min(first_returns):.2f} s to "
        f"{max(first_returns):.2f} s"
    )


# -- Server-Sent Events ------------------------------------------------------------


async def read_sse(
    response: aiohttp.ClientResponse, count: int
) -> list[dict[str, str]]:
    """Read `count` events (not heartbeats) from an event stream."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    while len(events) < count:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode()
        line = line.rstrip("\n")
        if line == "":
            if current.get("event") not in (None, "heartbeat", "ready"):
                events.append(current)
            current = {}
            continue
        name, _, value = line.partition(": ")
        current[name] = current.get(name, "") + value
    return events


async def test_sse_streams_a_snapshot_then_updates(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    wid = wf["workflow_id"]

    async with client.get(f"/api/workflows/{wid}/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        # The headers can come before the snapshot is read: a change made
        # before it would be in the snapshot, not after it.
        events = await read_sse(response, 1)
        await advance(client, wid, "via SSE")
        events += await read_sse(response, 1)

    assert [(e["event"], e["id"]) for e in events] == [
        ("snapshot", "1"),
        ("update", "2"),
    ]
    assert '"message":"via SSE"' in events[1]["data"]


async def test_sse_resumes_from_last_event_id(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client, steps=8)
    wid = wf["workflow_id"]
    for i in range(5):
        await advance(client, wid, f"a{i}")

    async with client.get(
        f"/api/workflows/{wid}/events", headers={"Last-Event-ID": "3"}
    ) as response:
        events = await read_sse(response, 3)

    assert [(e["event"], e["id"]) for e in events] == [
        ("update", "4"),
        ("update", "5"),
        ("update", "6"),
    ]


async def test_sse_for_an_unknown_workflow_is_a_404(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/api/workflows/nope/events")

    assert response.status == 404
