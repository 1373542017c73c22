"""The JSON API: every refusal beside the accepted call."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from .conftest import AUTH, create_workflow


async def test_create_returns_the_workflow_and_its_location(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post(
        "/api/workflows", json={"name": "Deploy", "steps": ["a", "b"]}, headers=AUTH
    )

    assert response.status == 201
    body = await response.json()
    assert response.headers["Location"] == f"/api/workflows/{body['workflow_id']}"
    assert (body["status"], body["current_step"], body["total_steps"]) == (
        "pending",
        0,
        2,
    )


async def test_create_without_a_token_is_refused(client: TestClient[Any, Any]) -> None:
    response = await client.post("/api/workflows", json={"name": "x", "steps": ["a"]})

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"
    listing = await (await client.get("/api/workflows")).json()
    assert listing["workflows"] == []


async def test_create_with_a_wrong_token_is_refused(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post(
        "/api/workflows",
        json={"name": "x", "steps": ["a"]},
        headers={"Authorization": "Bearer not-the-token"},
    )

    assert response.status == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": ["a"]}, "name"),
        ({"name": "x"}, "steps"),
        ({"name": "x", "steps": "a"}, None),
        ({"name": "x", "steps": [1, 2]}, "steps"),
        ({"name": "x", "steps": ["a"] * 201}, "steps"),
        ({"name": "x\u0000", "steps": ["a"]}, "name"),
    ],
)
async def test_create_with_a_bad_field_names_it(
    client: TestClient[Any, Any], body: dict[str, Any], field: str | None
) -> None:
    response = await client.post("/api/workflows", json=body, headers=AUTH)

    if field is None:
        assert response.status == 201
        return
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == field
    assert field in error["message"]


async def test_body_that_is_not_json_is_a_400(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/api/workflows",
        data=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )

    assert response.status == 400
    assert "JSON" in (await response.json())["error"]["message"]


async def test_get_and_list(client: TestClient[Any, Any]) -> None:
    first = await create_workflow(client, name="first")
    second = await create_workflow(client, name="second")
    await client.post(f"/api/workflows/{first['workflow_id']}/advance", headers=AUTH)

    listing = await (await client.get("/api/workflows")).json()
    one = await (await client.get(f"/api/workflows/{first['workflow_id']}")).json()

    ids = [w["workflow_id"] for w in listing["workflows"]]
    assert ids == [first["workflow_id"], second["workflow_id"]]
    assert one["current_step"] == 1
    assert [e["kind"] for e in one["history"]] == ["advanced", "created"]


async def test_list_limit_is_checked(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/api/workflows?limit=2")).status == 200
    response = await client.get("/api/workflows?limit=0")

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "limit"


async def test_advance_past_the_end_completes_then_conflicts(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=1)
    url = f"/api/workflows/{wf['workflow_id']}/advance"

    assert (await (await client.post(url, headers=AUTH)).json())["status"] == "running"
    assert (await (await client.post(url, headers=AUTH)).json())[
        "status"
    ] == "completed"
    refused = await client.post(url, headers=AUTH)

    assert refused.status == 409
    assert "reopen" in (await refused.json())["error"]["message"]


async def test_set_status_and_reopen(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client)
    url = f"/api/workflows/{wf['workflow_id']}/status"

    failed = await client.post(
        url, json={"status": "failed", "message": "boom"}, headers=AUTH
    )
    assert (await failed.json())["status"] == "failed"
    refused = await client.post(url, json={"status": "running"}, headers=AUTH)
    assert refused.status == 409
    reopened = await client.post(
        url, json={"status": "running", "reopen": True}, headers=AUTH
    )

    assert reopened.status == 200
    assert (await reopened.json())["status"] == "running"


async def test_unknown_status_is_a_400_naming_status(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)

    response = await client.post(
        f"/api/workflows/{wf['workflow_id']}/status",
        json={"status": "done"},
        headers=AUTH,
    )

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == "status"
    assert "completed" in error["message"]


async def test_message_is_required_and_checked(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client)
    url = f"/api/workflows/{wf['workflow_id']}/message"

    missing = await client.post(url, json={}, headers=AUTH)
    too_long = await client.post(url, json={"message": "x" * 2001}, headers=AUTH)
    fine = await client.post(url, json={"message": "halfway 🚀"}, headers=AUTH)

    assert (missing.status, too_long.status, fine.status) == (400, 400, 200)
    assert (await fine.json())["message"] == "halfway 🚀"
    assert (await fine.json())["seq"] == 2


async def test_unknown_workflow_is_a_json_404(client: TestClient[Any, Any]) -> None:
    for method, path, body in [
        ("GET", "/api/workflows/nope", None),
        ("POST", "/api/workflows/nope/advance", {}),
        ("POST", "/api/workflows/nope/status", {"status": "paused"}),
    ]:
        response = await client.request(method, path, json=body, headers=AUTH)
        assert response.status == 404, path
        assert (await response.json())["error"]["code"] == "not_found"


async def test_unknown_api_route_is_a_json_404(client: TestClient[Any, Any]) -> None:
    response = await client.get("/api/nothing-here")

    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_pages_send_security_headers(client: TestClient[Any, Any]) -> None:
    response = await client.get("/")

    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


async def test_an_unknown_field_is_a_400_naming_it(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post(
        "/api/workflows",
        json={"name": "x", "steps": ["a"], "stall_after": 60},
        headers=AUTH,
    )

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == "stall_after"
    assert "stall_after_s" in error["message"]
    listing = await (await client.get("/api/workflows")).json()
    assert listing["workflows"] == []
