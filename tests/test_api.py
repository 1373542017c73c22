"""The JSON API: every refusal beside the accepted call."""

from __future__ import annotations

import html
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from vapora.app_keys import STORE

from .conftest import AUTH, create_workflow
from .test_security import UPGRADE


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


async def post_json_text(
    client: TestClient[Any, Any], body: str | bytes
) -> aiohttp.ClientResponse:
    """Create a workflow from body, sent as it is rather than encoded from a dict."""
    return await client.post(
        "/api/workflows",
        data=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )


async def test_body_that_is_not_json_is_a_400(client: TestClient[Any, Any]) -> None:
    response = await post_json_text(client, b"{not json")

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


async def test_a_404_quotes_only_the_start_of_a_long_id(
    client: TestClient[Any, Any],
) -> None:
    for path in ("/api/workflows/", "/api/tokens/", "/api/webhooks/"):
        method = "GET" if path == "/api/workflows/" else "DELETE"
        response = await client.request(method, path + "w" * 5000, headers=AUTH)

        assert response.status == 404, path
        message = (await response.json())["error"]["message"]
        assert len(message) < 100 and message.endswith("...'"), message


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


# -- numbers, nesting and query strings -----------------------------------------


@pytest.mark.parametrize("timeout", [1e12, 1e300, 31_622_401])
async def test_gate_timeout_past_366_days_is_a_400_naming_it(
    client: TestClient[Any, Any], timeout: float
) -> None:
    steps = [{"name": "a", "gate": {"timeout_s": timeout}}, "b"]

    response = await client.post(
        "/api/workflows", json={"name": "x", "steps": steps}, headers=AUTH
    )

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == "timeout_s"
    assert "366 days" in error["message"]
    listing = await (await client.get("/api/workflows")).json()
    assert listing["workflows"] == []


async def test_gate_timeout_of_366_days_is_accepted_and_advanced_onto(
    client: TestClient[Any, Any],
) -> None:
    steps = [{"name": "a", "gate": {"timeout_s": 366 * 24 * 3600}}, "b"]
    made = await client.post(
        "/api/workflows", json={"name": "x", "steps": steps}, headers=AUTH
    )
    assert made.status == 201

    wid = (await made.json())["workflow_id"]
    response = await client.post(f"/api/workflows/{wid}/advance", headers=AUTH)

    assert response.status == 200
    assert (await response.json())["status"] == "waiting"


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
async def test_nan_and_infinity_are_not_json(
    client: TestClient[Any, Any], literal: str
) -> None:
    gate = '{"timeout_s": ' + literal + "}"
    body = '{"name": "x", "steps": [{"name": "a", "gate": ' + gate + '}, "b"]}'

    response = await post_json_text(client, body)

    assert response.status == 400
    assert "not valid JSON" in (await response.json())["error"]["message"]
    listing = await (await client.get("/api/workflows")).json()
    assert listing["workflows"] == []


@pytest.mark.parametrize("stall", ["1e999", "1" * 400])
async def test_stall_after_too_large_to_be_a_float_is_a_400(
    client: TestClient[Any, Any], stall: str
) -> None:
    body = '{"name": "x", "steps": ["a"], "stall_after_s": ' + stall + "}"

    response = await post_json_text(client, body)

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "stall_after_s"


async def test_deeply_nested_body_is_a_400(client: TestClient[Any, Any]) -> None:
    response = await post_json_text(client, b"[" * 30_000)

    assert response.status == 400
    assert "not valid JSON" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("limit", ["%C2%B2", "1" * 5000, "-1", "501", ""])
async def test_list_limit_that_is_no_plain_number_is_a_400_naming_it(
    client: TestClient[Any, Any], limit: str
) -> None:
    response = await client.get(f"/api/workflows?limit={limit}")

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == "limit"
    assert len(error["message"]) < 100


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("?after=%C2%B2", {}),
        ("?after=99999999999999999999999", {}),
        ("", {"Last-Event-ID": "²"}),
        ("", {"Last-Event-ID": "9223372036854775808"}),
    ],
)
@pytest.mark.parametrize("transport", ["updates", "events"])
async def test_bad_after_is_a_400_before_the_stream_starts(
    client: TestClient[Any, Any],
    query: str,
    headers: dict[str, str],
    transport: str,
) -> None:
    wf = await create_workflow(client)
    if transport == "updates":
        headers = {**headers, **UPGRADE}

    response = await client.get(
        f"/api/workflows/{wf['workflow_id']}/{transport}{query}", headers=headers
    )

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "after"


async def test_webhook_url_that_yarl_refuses_is_a_400_naming_it(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post(
        "/api/webhooks", json={"url": "http://[::1"}, headers=AUTH
    )

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "url"
    hooks = await (await client.get("/api/webhooks", headers=AUTH)).json()
    assert hooks["webhooks"] == []


# -- an unexpected error ---------------------------------------------------------


@pytest.fixture
def broken_listing(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> TestClient[Any, Any]:
    """The client of an app whose store fails, as a bug would, to list workflows."""

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(client.app[STORE], "list_workflows", broken)
    return client


async def test_unexpected_error_is_a_json_500_with_security_headers(
    broken_listing: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    client = broken_listing

    response = await client.get("/api/workflows")

    assert response.status == 500
    error = (await response.json())["error"]
    assert error["code"] == "internal_error"
    assert "fire" not in error["message"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" in response.headers
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert "GET /api/workflows" in logged[0].getMessage()


async def test_unexpected_error_on_a_page_is_the_error_page(
    broken_listing: TestClient[Any, Any],
) -> None:
    response = await broken_listing.get("/")

    assert response.status == 500
    assert response.content_type == "text/html"
    assert "fire" not in await response.text()
    assert response.headers["X-Frame-Options"] == "DENY"


# -- messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "says"),
    [
        ([1, 2], "got a number"),
        ([None], "got null"),
        ([{"gate": True}], "object with no name"),
        (["a", "  "], "one is empty"),
    ],
)
async def test_a_bad_step_is_described(
    client: TestClient[Any, Any], steps: list[Any], says: str
) -> None:
    response = await client.post(
        "/api/workflows", json={"name": "x", "steps": steps}, headers=AUTH
    )

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["field"] == "steps"
    assert says in error["message"]
    assert "must be a string" not in error["message"]
    assert "is required" not in error["message"]


@pytest.mark.parametrize(("count", "summary"), [(1, "1 step"), (2, "2 steps")])
async def test_created_summary_counts_steps_in_words(
    client: TestClient[Any, Any], count: int, summary: str
) -> None:
    wf = await create_workflow(client, steps=count)

    history = await (
        await client.get(f"/api/workflows/{wf['workflow_id']}/history")
    ).json()

    assert history["events"][-1]["summary"] == f"Created with {summary}"


async def test_each_change_answers_the_workflow_as_a_later_read_finds_it(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=2)
    base = f"/api/workflows/{wf['workflow_id']}"
    changes = [
        ("advance", {"message": "building"}),
        ("message", {"message": "half way"}),
        ("status", {"status": "failed", "message": "boom"}),
        ("status", {"status": "running", "reopen": True}),
        ("advance", None),
    ]

    for action, body in changes:
        answer = await client.post(f"{base}/{action}", json=body, headers=AUTH)
        assert answer.status == 200
        answered = await answer.json()
        read = await (await client.get(base, headers=AUTH)).json()

        assert read.pop("history")[0]["seq"] == answered["seq"]
        assert answered == read


@pytest.mark.parametrize(
    ("path", "content_type", "body", "message"),
    [
        (
            "/api/workflows",
            "application/json; charset=bogus",
            b'{"name": "x", "steps": ["a"]}',
            "the body's charset 'bogus' is unknown",
        ),
        (
            "/admin/login",
            "application/x-www-form-urlencoded; charset=bogus",
            b"token=x",
            "the form's charset 'bogus' is unknown",
        ),
        (
            "/admin/login",
            "multipart/form-data; boundary=x",
            b"--x\r\nbroken",
            "the form is malformed",
        ),
        ("/admin/login", "multipart/form-data", b"--x\r\n", "the form is malformed"),
    ],
    ids=["json-charset", "form-charset", "broken-multipart", "no-boundary"],
)
async def test_a_body_that_cannot_be_read_is_a_400_saying_why(
    client: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    path: str,
    content_type: str,
    body: bytes,
    message: str,
) -> None:
    response = await client.post(
        path, data=body, headers={**AUTH, "Content-Type": content_type}
    )

    assert response.status == 400
    assert message in html.unescape(await response.text())
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    listing = await (await client.get("/api/workflows", headers=AUTH)).json()
    assert listing["workflows"] == []


@pytest.mark.parametrize(
    ("path", "headers", "body", "message"),
    [
        (
            "/api/workflows",
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            b"garbage",
            "the body could not be decompressed",
        ),
        (
            "/admin/login",
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Content-Encoding": "deflate",
            },
            b"garbage",
            "the form is malformed",
        ),
        (
            "/admin/login",
            {"Content-Type": "multipart/form-data; boundary=zz"},
            b'--zz\r\nContent-Disposition: form-data; name="token"\r\n'
            b"Content-Transfer-Encoding: foo\r\n\r\nhi\r\n--zz--\r\n",
            "the form is malformed",
        ),
    ],
    ids=["json-gzip", "form-deflate", "unknown-transfer-encoding"],
)
async def test_a_body_that_cannot_be_decoded_is_a_400(
    client: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    path: str,
    headers: dict[str, str],
    body: bytes,
    message: str,
) -> None:
    response = await client.post(path, data=body, headers={**AUTH, **headers})

    assert response.status == 400
    assert message in html.unescape(await response.text())
    # aiohttp itself logs the rest of the body failing; `vapora serve` makes
    # that one line (tests/test_cli.py).
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert not [r for r in errors if r.name.startswith("vapora")]


async def test_a_token_for_a_workflow_id_sqlite_cannot_take_is_a_404(
    client: TestClient[Any, Any],
) -> None:
    body = {"name": "t", "scope": "read", "workflow_id": "\ud800"}

    response = await client.post("/api/tokens", json=body, headers=AUTH)

    assert response.status == 404
    assert (await response.json())["error"]["field"] == "workflow_id"
