"""The hub and the WebSocket transport, through real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from vapora.app_keys import HUB

from .conftest import AUTH, create_workflow


async def advance(
    client: TestClient[Any, Any], workflow_id: str, message: str = ""
) -> None:
    response = await client.post(
        f"/api/workflows/{workflow_id}/advance", json={"message": message}, headers=AUTH
    )
    assert response.status == 200, await response.text()


async def set_message(
    client: TestClient[Any, Any], workflow_id: str, message: str
) -> None:
    response = await client.post(
        f"/api/workflows/{workflow_id}/message", json={"message": message}, headers=AUTH
    )
    assert response.status == 200, await response.text()


async def frames_until(
    ws: aiohttp.ClientWebSocketResponse, seq: int
) -> list[dict[str, Any]]:
    """Read frames until one reaches seq; fail if the socket closes first."""
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["seq"] < seq:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame = msg.json()
        if frame["type"] not in ("heartbeat", "ready", "presence"):
            frames.append(frame)
    return frames


async def test_first_frame_is_a_snapshot_with_the_current_seq(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    await advance(client, wf["workflow_id"], "building")

    async with client.ws_connect(f"/api/workflows/{wf['workflow_id']}/updates") as ws:
        snapshot = await ws.receive_json(timeout=5)

    assert snapshot["type"] == "snapshot"
    assert snapshot["seq"] == 2
    assert snapshot["current_step"] == 1
    assert snapshot["total_steps"] == 3
    assert snapshot["status"] == "running"
    assert snapshot["message"] == "building"
    assert snapshot["workflow_id"] == wf["workflow_id"]
    assert [s["name"] for s in snapshot["steps"]] == ["step 1", "step 2", "step 3"]
    assert snapshot["timestamp"].endswith("+00:00")
    assert [e["seq"] for e in snapshot["history"]] == [2, 1]


async def test_unknown_workflow_gets_404_before_the_upgrade(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get(
        "/api/workflows/nosuchthing/updates",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )

    assert response.status == 404
    assert (await response.json())["error"]["field"] == "workflow_id"


async def test_a_plain_get_of_a_socket_address_says_to_upgrade(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)

    for path in (f"/api/workflows/{wf['workflow_id']}/updates", "/api/updates"):
        response = await client.get(path)

        assert response.status == 400
        error = (await response.json())["error"]
        assert error["field"] == "Upgrade"
        assert "send Upgrade: websocket" in error["message"]


async def test_each_change_arrives_once_in_seq_order(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=10)
    wid = wf["workflow_id"]

    async with client.ws_connect(f"/api/workflows/{wid}/updates") as ws:
        assert (await ws.receive_json(timeout=5))["seq"] == 1
        for i in range(10):
            await advance(client, wid, f"m{i}")
        frames = await frames_until(ws, 11)

    assert [f["seq"] for f in frames] == list(range(2, 12))
    assert all(f["type"] == "update" for f in frames)
    assert frames[0]["kind"] == "advanced"
    assert frames[0]["actor"] == "admin"
    assert frames[-1]["message"] == "m9"


async def test_subscriber_never_sees_another_workflows_frames(
    client: TestClient[Any, Any],
) -> None:
    mine = await create_workflow(client, name="mine")
    other = await create_workflow(client, name="other")

    async with client.ws_connect(f"/api/workflows/{mine['workflow_id']}/updates") as ws:
        await ws.receive_json(timeout=5)
        for i in range(5):
            await set_message(client, other["workflow_id"], f"not yours {i}")
        await set_message(client, mine["workflow_id"], "yours")
        frames = await frames_until(ws, 2)

    assert [(f["workflow_id"], f["message"]) for f in frames] == [
        (mine["workflow_id"], "yours")
    ]


async def test_concurrent_writers_reach_every_subscriber_in_seq_order(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=50)
    wid = wf["workflow_id"]
    sockets = [
        await client.ws_connect(f"/api/workflows/{wid}/updates") for _ in range(5)
    ]
    for ws in sockets:
        await ws.receive_json(timeout=5)

    await asyncio.gather(*(set_message(client, wid, f"w{i}") for i in range(30)))

    for ws in sockets:
        frames = await frames_until(ws, 31)
        assert [f["seq"] for f in frames] == list(range(2, 32))
        await ws.close()


async def test_200_sockets_all_receive_a_burst_of_50(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=60)
    wid = wf["workflow_id"]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    url = client.make_url(f"/api/workflows/{wid}/updates")
    sockets = await asyncio.gather(*(session.ws_connect(url) for _ in range(200)))
    await asyncio.gather(*(ws.receive_json(timeout=10) for ws in sockets))
    assert client.app[HUB].subscribers(wid) == 200

    for i in range(50):
        await advance(client, wid, f"burst {i}")

    results = await asyncio.gather(*(frames_until(ws, 51) for ws in sockets))
    for frames in results:
        assert [f["seq"] for f in frames] == list(range(2, 52))
    await asyncio.gather(*(ws.close() for ws in sockets))
    await session.close()


async def test_socket_closed_mid_burst_leaves_and_the_rest_still_get_everything(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=40)
    wid = wf["workflow_id"]
    hub = client.app[HUB]
    sockets = [
        await client.ws_connect(f"/api/workflows/{wid}/updates") for _ in range(10)
    ]
    for ws in sockets:
        await ws.receive_json(timeout=5)
    quitter, stayers = sockets[0], sockets[1:]

    for i in range(30):
        if i == 10:
            await quitter.close()
        await advance(client, wid, f"m{i}")

    for ws in stayers:
        frames = await frames_until(ws, 31)
        assert [f["seq"] for f in frames] == list(range(2, 32))
    await wait_for_subscribers(client, wid, 9)
    assert hub.subscribers(wid) == 9
    for ws in stayers:
        await ws.close()


async def test_empty_groups_are_removed(client: TestClient[Any, Any]) -> None:
    hub = client.app[HUB]
    workflows = [await create_workflow(client, name=f"w{i}") for i in range(5)]

    for wf in workflows:
        async with client.ws_connect(
            f"/api/workflows/{wf['workflow_id']}/updates"
        ) as ws:
            await ws.receive_json(timeout=5)
            assert hub.watched_workflows() >= 1
    for wf in workflows:
        await wait_for_subscribers(client, wf["workflow_id"], 0)

    assert hub.watched_workflows() == 0
    assert hub.subscribers() == 0


async def test_server_pings_and_sends_heartbeats_on_its_schedule(
    app_factory: Any,
) -> None:
    client = await app_factory(heartbeat_s=0.2)
    wf = await create_workflow(client)

    async with client.ws_connect(
        f"/api/workflows/{wf['workflow_id']}/updates", autoping=False
    ) as ws:
        await ws.receive_json(timeout=5)
        kinds: list[aiohttp.WSMsgType] = []
        while aiohttp.WSMsgType.PING not in kinds or len(kinds) < 3:
            msg = await ws.receive(timeout=5)
            kinds.append(msg.type)
            if msg.type is aiohttp.WSMsgType.TEXT:
                beat = msg.json()

    assert beat["type"] == "heartbeat"
    assert beat["now"].endswith("+00:00")
    assert aiohttp.WSMsgType.TEXT in kinds


async def test_list_socket_starts_with_the_list_and_follows_every_workflow(
    client: TestClient[Any, Any],
) -> None:
    first = await create_workflow(client, name="first")

    async with client.ws_connect("/api/updates") as ws:
        listing = await ws.receive_json(timeout=5)
        assert (await ws.receive_json(timeout=5))["type"] == "ready"
        second = await create_workflow(client, name="second")
        created = await ws.receive_json(timeout=5)

    assert listing["type"] == "list"
    assert [w["workflow_id"] for w in listing["workflows"]] == [first["workflow_id"]]
    assert created["type"] == "update"
    assert created["workflow_id"] == second["workflow_id"]


async def wait_for_subscribers(
    client: TestClient[Any, Any], wid: str, count: int
) -> None:
    """Wait until the server has noticed sockets closing (it learns asynchronously)."""
    hub = client.app[HUB]
    async with asyncio.timeout(5):
        while hub.subscribers(wid) != count:
            await asyncio.sleep(0.01)
