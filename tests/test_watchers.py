"""Gates, stalls, presence, estimates and webhooks, through the API and sockets."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from vapora.app_keys import STORE
from vapora.timers import fire_due

from .conftest import AUTH, create_workflow
from .test_admin import csrf_from, sign_in
from .test_security import bearer, make_token
from .test_ws import advance, frames_until


async def create_gated(
    client: TestClient[Any, Any], gate: Any = True, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/workflows",
        json={
            "name": "Release",
            "steps": ["build", {"name": "ship", "gate": gate}],
            **extra,
        },
        headers=AUTH,
    )
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def answer(
    client: TestClient[Any, Any],
    wid: str,
    decision: str,
    comment: str,
    headers: Any = AUTH,
) -> aiohttp.ClientResponse:
    return await client.post(
        f"/api/workflows/{wid}/gate",
        json={"decision": decision, "comment": comment},
        headers=headers,
    )


# -- gates -----------------------------------------------------------------------


async def test_reaching_a_gate_waits_for_a_person(client: TestClient[Any, Any]) -> None:
    wf = await create_gated(client, {"approvers": ["release-manager"]})
    wid = wf["workflow_id"]
    await advance(client, wid)

    waiting = await (
        await client.post(f"/api/workflows/{wid}/advance", headers=AUTH)
    ).json()
    refused = await client.post(f"/api/workflows/{wid}/advance", headers=AUTH)
    page = await (await client.get(f"/workflows/{wid}")).text()

    assert (waiting["status"], waiting["current_step"]) == ("waiting", 2)
    assert refused.status == 409
    assert "approve or reject" in (await refused.json())["error"]["message"]
    assert "waits for approval from release-manager or an admin" in page


async def test_approval_is_recorded_and_moves_on(client: TestClient[Any, Any]) -> None:
    wf = await create_gated(client)
    wid = wf["workflow_id"]
    await advance(client, wid)
    await advance(client, wid)

    approved = await answer(client, wid, "approve", "looks good")

    state = await (await client.get(f"/api/workflows/{wid}")).json()
    assert approved.status == 200
    gate = state["steps"][1]["gate"]
    assert (gate["decision"], gate["decided_by"], gate["comment"]) == (
        "approved",
        "admin",
        "looks good",
    )
    assert gate["decided_at"].endswith("+00:00")
    assert state["status"] == "completed"
    assert "Approved by admin: looks good" in [e["summary"] for e in state["history"]]


async def test_rejection_fails_the_workflow(client: TestClient[Any, Any]) -> None:
    wf = await create_gated(client)
    wid = wf["workflow_id"]
    await advance(client, wid)
    await advance(client, wid)

    rejected = await (await answer(client, wid, "reject", "not today")).json()

    assert rejected["status"] == "failed"
    assert rejected["steps"][1]["state"] == "failed"
    assert rejected["steps"][1]["gate"]["decision"] == "rejected"


async def test_a_gate_needs_a_comment_and_a_decision(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_gated(client)
    wid = wf["workflow_id"]
    await advance(client, wid)
    await advance(client, wid)

    no_comment = await answer(client, wid, "approve", "  ")
    bad_decision = await answer(client, wid, "maybe", "hmm")

    assert (no_comment.status, bad_decision.status) == (400, 400)
    assert (await no_comment.json())["error"]["field"] == "comment"
    assert (await bad_decision.json())["error"]["field"] == "decision"
    state = await (await client.get(f"/api/workflows/{wid}")).json()
    assert state["status"] == "waiting"


async def test_answering_without_an_open_gate_is_a_409(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_gated(client)

    response = await answer(client, wf["workflow_id"], "approve", "early")

    assert response.status == 409


async def test_only_admins_and_named_approvers_may_answer(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_gated(client, {"approvers": ["alice"]})
    wid = wf["workflow_id"]
    await advance(client, wid)
    await advance(client, wid)
    alice = await make_token(client, "alice", "publish", wid)
    bob = await make_token(client, "bob", "publish", wid)

    refused = await answer(client, wid, "approve", "me too", bearer(bob))
    accepted = await answer(client, wid, "approve", "ship it", bearer(alice))

    assert (refused.status, accepted.status) == (403, 200)
    state = await accepted.json()
    assert state["steps"][1]["gate"]["decided_by"] == "alice"


async def test_a_gate_timeout_decides_when_nobody_answers(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_gated(client, {"timeout_s": 0.05, "on_timeout": "approve"})
    wid = wf["workflow_id"]
    await advance(client, wid)
    waiting = await (
        await client.post(f"/api/workflows/{wid}/advance", headers=AUTH)
    ).json()
    assert waiting["status"] == "waiting"

    async with client.ws_connect(f"/api/workflows/{wid}/updates") as ws:
        await ws.receive_json(timeout=5)
        decided = (await frames_until(ws, waiting["seq"] + 1))[-1]

    gate = decided["steps"][1]["gate"]
    assert (gate["decision"], gate["decided_by"]) == ("approved", "timeout")
    assert "no answer within 0.05 s" in gate["comment"]


async def test_bad_gates_are_refused(client: TestClient[Any, Any]) -> None:
    for gate, field in [
        ({"timeout_s": -1}, "timeout_s"),
        ({"on_timeout": "shrug"}, "on_timeout"),
        ({"approvers": "alice"}, "approvers"),
        ({"colour": "red"}, "gate"),
    ]:
        response = await client.post(
            "/api/workflows",
            json={"name": "x", "steps": [{"name": "a", "gate": gate}]},
            headers=AUTH,
        )
        assert response.status == 400, gate
        assert (await response.json())["error"]["field"] == field


# -- stalls ------------------------------------------------------------------------


async def test_a_silent_workflow_stalls_and_the_next_change_revives_it(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    wid = wf["workflow_id"]
    store = client.app[STORE]
    set_stall = await client.post(
        "/api/workflows",
        json={"name": "s", "steps": ["a", "b"], "stall_after_s": 1},
        headers=AUTH,
    )
    sid = (await set_stall.json())["workflow_id"]
    await advance(client, sid)
    await advance(client, wid)

    async with client.ws_connect(f"/api/workflows/{sid}/updates") as ws:
        await ws.receive_json(timeout=5)
        while not (await store.get_workflow(sid)).stall_at <= _now_plus(0):
            await asyncio.sleep(0.05)
        await fire_due(store)
        stalled = (await frames_until(ws, 3))[-1]
        await advance(client, sid, "back")
        revived = (await frames_until(ws, 4))[-1]

    assert (stalled["kind"], stalled["stalled"], stalled["badge_label"]) == (
        "stalled",
        True,
        "Stalled",
    )
    assert stalled["status"] == "running"
    assert (revived["stalled"], revived["badge_status"]) == (False, "running")
    other = await store.get_workflow(wid)
    assert not other.stalled


def _now_plus(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(
        timespec="milliseconds"
    )


async def test_stall_interval_is_learned_from_finished_steps(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=4)
    wid = wf["workflow_id"]
    store = client.app[STORE]
    await advance(client, wid)
    assert (await store.get_workflow(wid)).stall_interval_s is None

    await advance(client, wid)

    learned = (await store.get_workflow(wid)).stall_interval_s
    assert learned == 10.0  # three times a fast step, but never under the floor


async def test_the_list_shows_a_stalled_workflow(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/api/workflows",
        json={"name": "s", "steps": ["a"], "stall_after_s": 1},
        headers=AUTH,
    )
    wid = (await response.json())["workflow_id"]
    await advance(client, wid)
    store = client.app[STORE]
    # The server's own timer may mark it first; then stall_at is None.
    while (stall_at := (await store.get_workflow(wid)).stall_at) is not None:
        if stall_at <= _now_plus(0):
            break
        await asyncio.sleep(0.05)

    await fire_due(store)

    html = await (await client.get("/")).text()
    assert 'data-status="stalled"' in html
    assert ">Stalled<" in html


# -- presence and estimates --------------------------------------------------------


async def test_watchers_learn_how_many_watch(app_factory: Any) -> None:
    client = await app_factory(presence_interval_s=0.05)
    wf = await create_workflow(client)
    url = f"/api/workflows/{wf['workflow_id']}/updates"

    first = await client.ws_connect(url)
    counts = await presence_counts(first, wf["workflow_id"], until=1)
    second = await client.ws_connect(url)
    counts += await presence_counts(first, wf["workflow_id"], until=2)
    await second.close()
    counts += await presence_counts(first, wf["workflow_id"], until=1)
    page = await (await client.get(f"/workflows/{wf['workflow_id']}")).text()
    await first.close()

    assert 2 in counts
    assert counts[-1] == 1
    assert '<span data-field="watching">1</span> watching now' in page


async def presence_counts(
    ws: aiohttp.ClientWebSocketResponse, wid: str, until: int
) -> list[int]:
    seen: list[int] = []
    while not seen or seen[-1] != until:
        frame = await ws.receive_json(timeout=5)
        if frame["type"] == "presence":
            seen.append(frame["watching"][wid])
    return seen


async def test_list_watchers_get_every_workflows_count(app_factory: Any) -> None:
    client = await app_factory(presence_interval_s=0.05)
    wf = await create_workflow(client)

    async with client.ws_connect("/api/updates") as listing:
        async with client.ws_connect(f"/api/workflows/{wf['workflow_id']}/updates"):
            frame: dict[str, Any] = {"type": ""}
            while frame["type"] != "presence" or not frame["watching"]:
                frame = await listing.receive_json(timeout=5)

    assert frame["watching"] == {wf["workflow_id"]: 1}


async def test_pages_show_usual_step_times_from_past_runs(
    client: TestClient[Any, Any],
) -> None:
    for _ in range(2):
        done = await create_workflow(client, name="Nightly", steps=2)
        for _ in range(3):
            await advance(client, done["workflow_id"])
    current = await create_workflow(client, name="Nightly", steps=2)
    await advance(client, current["workflow_id"])

    html = await (await client.get(f"/workflows/{current['workflow_id']}")).text()
    fresh = await create_workflow(client, name="Never ran")
    other = await (await client.get(f"/workflows/{fresh['workflow_id']}")).text()

    assert "usually 0s" in html
    assert 'data-field="estimate">Usually done by <time' in html
    assert "usually" not in other


# -- webhooks -------------------------------------------------------------------------


class Receiver:
    """A webhook endpoint on 127.0.0.1 that fails its first answers on purpose."""

    def __init__(self, failures: int = 0, hang: bool = False) -> None:
        self.failures = failures
        self.hang = hang
        self.bodies: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append((dict(request.headers), await request.read()))
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        if len(self.bodies) <= self.failures:
            return web.Response(status=500)
        return web.Response(text="thanks")

    async def start(self) -> TestServer:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        return server


async def wait_for_delivery(client: TestClient[Any, Any]) -> dict[str, Any]:
    while True:
        listing = await (await client.get("/api/webhooks", headers=AUTH)).json()
        if listing["deliveries"]:
            return dict(listing["deliveries"][0])
        await asyncio.sleep(0.02)


async def test_webhook_is_signed_retried_and_recorded(app_factory: Any) -> None:
    client = await app_factory(webhook_retry_base_s=0.01)
    receiver = Receiver(failures=2)
    server = await receiver.start()
    made = await client.post(
        "/api/webhooks",
        json={"url": str(server.make_url("/hook")), "events": ["completed"]},
        headers=AUTH,
    )
    hook = await made.json()
    wf = await create_workflow(client, steps=1)

    await advance(client, wf["workflow_id"])
    await advance(client, wf["workflow_id"])
    delivery = await wait_for_delivery(client)

    assert made.status == 201
    assert (delivery["outcome"], delivery["attempts"], delivery["event"]) == (
        "delivered",
        3,
        "completed",
    )
    headers, body = receiver.bodies[-1]
    expected = hmac.new(hook["secret"].encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Vapora-Signature"] == f"sha256={expected}"
    payload = json.loads(body)
    assert (payload["event"], payload["workflow"]["status"]) == (
        "completed",
        "completed",
    )
    assert len(receiver.bodies) == 3
    await server.close()


async def test_webhook_that_keeps_failing_is_recorded_as_failed(
    app_factory: Any,
) -> None:
    client = await app_factory(webhook_retry_base_s=0.01, webhook_attempts=2)
    receiver = Receiver(failures=99)
    server = await receiver.start()
    await client.post(
        "/api/webhooks", json={"url": str(server.make_url("/hook"))}, headers=AUTH
    )
    wf = await create_gated(client)

    await advance(client, wf["workflow_id"])
    await advance(client, wf["workflow_id"])
    delivery = await wait_for_delivery(client)

    assert (delivery["outcome"], delivery["attempts"], delivery["event"]) == (
        "failed",
        2,
        "waiting",
    )
    assert delivery["detail"].startswith("500")
    await server.close()


async def test_slow_webhook_never_delays_updates(app_factory: Any) -> None:
    client = await app_factory(webhook_timeout_s=30)
    receiver = Receiver(hang=True)
    server = await receiver.start()
    await client.post(
        "/api/webhooks", json={"url": str(server.make_url("/hook"))}, headers=AUTH
    )
    wf = await create_workflow(client, steps=1)
    wid = wf["workflow_id"]

    async with client.ws_connect(f"/api/workflows/{wid}/updates") as ws:
        await ws.receive_json(timeout=5)
        await advance(client, wid)
        await advance(client, wid)
        await receiver.arrived.wait()
        await client.post(
            f"/api/workflows/{wid}/message", json={"message": "after"}, headers=AUTH
        )
        frames = await frames_until(ws, 4)

    assert [f["seq"] for f in frames] == [2, 3, 4]
    assert not receiver.release.is_set()
    receiver.release.set()
    await server.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "http://127.0.0.1/x", "events": ["exploded"]}, "events"),
    ],
)
async def test_bad_webhooks_are_refused(
    client: TestClient[Any, Any], body: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/webhooks", json=body, headers=AUTH)

    assert response.status == 400
    assert (await response.json())["error"]["field"] == field


async def test_only_admins_manage_webhooks(client: TestClient[Any, Any]) -> None:
    wide = await make_token(client, "wide", "publish_any")

    response = await client.post(
        "/api/webhooks", json={"url": "http://127.0.0.1:9/x"}, headers=bearer(wide)
    )

    assert response.status == 403


async def test_admin_page_adds_lists_and_removes_webhooks(
    client: TestClient[Any, Any],
) -> None:
    await sign_in(client)
    csrf = await csrf_from(client, "/admin/webhooks")

    made = await client.post(
        "/admin/webhooks",
        data={"csrf_token": csrf, "url": "http://127.0.0.1:9/hook", "events": "failed"},
    )
    html = await made.text()
    refused = await client.post(
        "/admin/webhooks", data={"csrf_token": csrf, "url": "gopher://x"}
    )
    listed = await (await client.get("/api/webhooks", headers=AUTH)).json()
    hook = listed["webhooks"][0]
    removed = await client.post(
        f"/admin/webhooks/{hook['id']}/delete",
        data={"csrf_token": csrf},
        allow_redirects=False,
    )

    assert made.status == 201
    assert 'data-field="new-secret">whsec_' in html
    assert hook["events"] == ["failed"]
    assert refused.status == 400
    assert "http or https" in await refused.text()
    assert removed.status == 303
    listing = await (await client.get("/api/webhooks", headers=AUTH)).json()
    assert listing["webhooks"] == []


async def test_a_gate_cannot_be_skipped_by_completing_the_workflow(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_gated(client)
    wid = wf["workflow_id"]
    url = f"/api/workflows/{wid}/status"

    before = await client.post(url, json={"status": "completed"}, headers=AUTH)
    await advance(client, wid)
    await advance(client, wid)
    at_gate = await client.post(url, json={"status": "completed"}, headers=AUTH)
    cancelled = await client.post(url, json={"status": "cancelled"}, headers=AUTH)

    assert (before.status, at_gate.status, cancelled.status) == (409, 409, 200)
    assert (
        "step 2 needs a person's approval" in (await at_gate.json())["error"]["message"]
    )
    state = await cancelled.json()
    assert state["steps"][1]["gate"]["decision"] is None


async def test_a_reopened_gate_waits_again_with_its_full_timeout(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_gated(client, {"timeout_s": 3600})
    wid = wf["workflow_id"]
    await advance(client, wid)
    await advance(client, wid)
    await answer(client, wid, "reject", "not today")
    rejected = await (await client.get(f"/api/workflows/{wid}")).json()

    reopened = await client.post(
        f"/api/workflows/{wid}/status",
        json={"status": "running", "reopen": True},
        headers=AUTH,
    )

    state = await reopened.json()
    assert reopened.status == 200
    assert state["status"] == "waiting"
    assert state["steps"][1]["gate"]["decision"] is None
    assert state["steps"][1]["started_at"] > rejected["steps"][1]["started_at"]
    stored = await client.app[STORE].get_workflow(wid)
    assert stored.gate_deadline is not None
    assert stored.gate_deadline > _now_plus(3500)


async def test_each_gate_in_a_row_sends_its_own_waiting_webhook(
    app_factory: Any,
) -> None:
    client = await app_factory()
    receiver = Receiver()
    server = await receiver.start()
    await client.post(
        "/api/webhooks",
        json={"url": str(server.make_url("/hook")), "events": ["waiting"]},
        headers=AUTH,
    )
    steps = ["build", {"name": "qa", "gate": True}, {"name": "prod", "gate": True}]
    made = await client.post(
        "/api/workflows", json={"name": "Release", "steps": steps}, headers=AUTH
    )
    wid = (await made.json())["workflow_id"]

    await advance(client, wid)
    await advance(client, wid)
    await answer(client, wid, "approve", "qa passed")
    async with asyncio.timeout(10):
        while len(receiver.bodies) < 2:
            await receiver.arrived.wait()
            receiver.arrived.clear()

    waiting_at = [
        json.loads(body)["workflow"]["current_step"] for _, body in receiver.bodies
    ]
    assert waiting_at == [2, 3]
    await server.close()


async def test_a_gate_reopened_after_a_cancel_waits_with_its_full_timeout(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_gated(client, {"timeout_s": 3600, "on_timeout": "approve"})
    wid = wf["workflow_id"]
    url = f"/api/workflows/{wid}/status"
    await advance(client, wid)
    await advance(client, wid)
    cancelled = await (
        await client.post(url, json={"status": "cancelled"}, headers=AUTH)
    ).json()

    reopened = await client.post(
        url, json={"status": "running", "reopen": True}, headers=AUTH
    )

    state = await reopened.json()
    assert state["status"] == "waiting"
    assert state["steps"][1]["started_at"] > cancelled["steps"][1]["started_at"]
    stored = await client.app[STORE].get_workflow(wid)
    assert stored.gate_deadline is not None
    assert stored.gate_deadline > _now_plus(3500)


async def test_starting_a_workflow_at_a_gate_waits_for_it(
    client: TestClient[Any, Any],
) -> None:
    made = await client.post(
        "/api/workflows",
        json={"name": "g", "steps": [{"name": "approve", "gate": True}, "ship"]},
        headers=AUTH,
    )
    wid = (await made.json())["workflow_id"]

    started = await client.post(
        f"/api/workflows/{wid}/status", json={"status": "running"}, headers=AUTH
    )

    state = await started.json()
    assert (state["status"], state["current_step"]) == ("waiting", 1)
    assert (await client.app[STORE].get_workflow(wid)).open_gate is not None


async def test_a_delivery_waiting_to_retry_survives_a_clean_restart(
    app_factory: Any,
) -> None:
    receiver = Receiver(failures=1)
    server = await receiver.start()
    before = await app_factory(webhook_retry_base_s=3600)
    await before.post(
        "/api/webhooks",
        json={"url": str(server.make_url("/hook")), "events": ["completed"]},
        headers=AUTH,
    )
    wf = await create_workflow(before, steps=1)
    await advance(before, wf["workflow_id"])
    await advance(before, wf["workflow_id"])
    async with asyncio.timeout(10):
        await receiver.arrived.wait()

    await before.close()  # the first attempt failed; the next is an hour away
    after = await app_factory(webhook_retry_base_s=0.01)
    async with asyncio.timeout(10):
        delivery = await wait_for_delivery(after)

    assert (delivery["outcome"], delivery["attempts"]) == ("delivered", 2)
    ids = [headers["X-Vapora-Delivery"] for headers, _ in receiver.bodies]
    assert len(ids) == 2 and ids[0] == ids[1]
    await server.close()
