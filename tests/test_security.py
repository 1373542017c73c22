"""Every door: tokens and scopes, private reading, origins, limits and bad text."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from .conftest import AUTH, create_workflow
from .test_admin import csrf_from, sign_in

UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def make_token(
    client: TestClient[Any, Any], name: str, scope: str, workflow_id: str | None = None
) -> dict[str, Any]:
    body = {"name": name, "scope": scope, "workflow_id": workflow_id}
    response = await client.post("/api/tokens", json=body, headers=AUTH)
    assert response.status == 201, await response.text()
    return dict(await response.json())


def bearer(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['token']}"}


# -- tokens and scopes -------------------------------------------------------------


async def test_publish_token_changes_its_workflow_and_is_named_in_history(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    token = await make_token(client, "ci-runner", "publish", wf["workflow_id"])

    response = await client.post(
        f"/api/workflows/{wf['workflow_id']}/advance", headers=bearer(token)
    )

    assert response.status == 200
    state = await (await client.get(f"/api/workflows/{wf['workflow_id']}")).json()
    assert state["history"][0]["actor"] == "ci-runner"
    page = await (await client.get(f"/workflows/{wf['workflow_id']}")).text()
    assert "<td>ci-runner</td>" in page


async def test_publish_token_may_not_touch_another_workflow(
    client: TestClient[Any, Any],
) -> None:
    mine = await create_workflow(client, name="mine")
    other = await create_workflow(client, name="other")
    token = await make_token(client, "ci-runner", "publish", mine["workflow_id"])

    response = await client.post(
        f"/api/workflows/{other['workflow_id']}/advance", headers=bearer(token)
    )

    assert response.status == 403
    state = await (await client.get(f"/api/workflows/{other['workflow_id']}")).json()
    assert state["seq"] == 1


async def test_only_publish_any_tokens_create_workflows(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    narrow = await make_token(client, "narrow", "publish", wf["workflow_id"])
    wide = await make_token(client, "wide", "publish_any")
    body = {"name": "new", "steps": ["a"]}

    refused = await client.post("/api/workflows", json=body, headers=bearer(narrow))
    accepted = await client.post("/api/workflows", json=body, headers=bearer(wide))

    assert (refused.status, accepted.status) == (403, 201)
    assert "history" not in await accepted.json()


async def test_read_token_reads_but_does_not_publish(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    reader = await make_token(client, "dashboard", "read")

    refused = await client.post(
        f"/api/workflows/{wf['workflow_id']}/advance", headers=bearer(reader)
    )
    read = await client.get(
        f"/api/workflows/{wf['workflow_id']}", headers=bearer(reader)
    )

    assert (refused.status, read.status) == (403, 200)


async def test_revoked_token_is_refused_at_once(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client)
    token = await make_token(client, "temp", "publish", wf["workflow_id"])
    url = f"/api/workflows/{wf['workflow_id']}/advance"
    assert (await client.post(url, headers=bearer(token))).status == 200

    deleted = await client.delete(f"/api/tokens/{token['id']}", headers=AUTH)
    refused = await client.post(url, headers=bearer(token))

    assert deleted.status == 204
    assert refused.status == 401
    assert "revoked" in (await refused.json())["error"]["message"]


async def test_only_admins_manage_tokens_and_reset(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    wide = await make_token(client, "wide", "publish_any")

    tokens = await client.post(
        "/api/tokens", json={"name": "x", "scope": "admin"}, headers=bearer(wide)
    )
    reset = await client.post(
        f"/api/workflows/{wf['workflow_id']}/reset", headers=bearer(wide)
    )

    assert (tokens.status, reset.status) == (403, 403)


async def test_token_secret_is_shown_once_and_stored_hashed(
    client: TestClient[Any, Any], settings: Any
) -> None:
    token = await make_token(client, "shown-once", "read")

    listing = await (await client.get("/api/tokens", headers=AUTH)).json()

    assert [t["name"] for t in listing["tokens"]] == ["shown-once"]
    assert "token" not in listing["tokens"][0]
    dump = "\n".join(sqlite3.connect(settings.db).iterdump())
    assert token["token"] not in dump


async def test_token_names_are_unique_among_live_tokens(
    client: TestClient[Any, Any],
) -> None:
    await make_token(client, "twin", "read")

    response = await client.post(
        "/api/tokens", json={"name": "twin", "scope": "read"}, headers=AUTH
    )

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "name"


async def test_tokens_made_at_once_with_one_name_give_one_and_clear_refusals(
    client: TestClient[Any, Any],
) -> None:
    body = {"name": "race", "scope": "read"}

    responses = await asyncio.gather(
        *(client.post("/api/tokens", json=body, headers=AUTH) for _ in range(10))
    )

    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [400] * 9
    refusals = [await r.json() for r in responses if r.status == 400]
    assert {e["error"]["message"] for e in refusals} == {
        "a token named 'race' already exists"
    }
    listing = await (await client.get("/api/tokens", headers=AUTH)).json()
    assert [t["name"] for t in listing["tokens"]] == ["race"]


async def test_admin_page_makes_a_token_and_shows_it_once(
    client: TestClient[Any, Any],
) -> None:
    await sign_in(client)
    csrf = await csrf_from(client, "/admin/tokens")

    made = await client.post(
        "/admin/tokens",
        data={"csrf_token": csrf, "name": "deploy-bot", "scope": "publish_any"},
    )
    again = await client.get("/admin/tokens")

    html = await made.text()
    assert made.status == 201
    secret = html.split('data-field="new-secret">')[1].split("<")[0]
    assert secret.startswith("vpr_")
    assert secret not in await again.text()
    create = await client.post(
        "/api/workflows",
        json={"name": "w", "steps": ["a"]},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert create.status == 201


# -- private reading -------------------------------------------------------------


@pytest.fixture
async def private(app_factory: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await app_factory(read_access="private")
    return client


async def test_private_workflow_needs_a_reader(private: TestClient[Any, Any]) -> None:
    wf = await create_workflow(private)
    wid = wf["workflow_id"]

    page = await private.get(f"/workflows/{wid}")
    api = await private.get(f"/api/workflows/{wid}")
    ws = await private.get(f"/api/workflows/{wid}/updates", headers=UPGRADE)
    sse = await private.get(f"/api/workflows/{wid}/events")
    listing = await (await private.get("/api/workflows")).json()
    index = await (await private.get("/")).text()

    assert (page.status, api.status, ws.status, sse.status) == (401, 401, 401, 401)
    assert listing["workflows"] == []
    assert "Deploy" not in index


async def test_a_stranger_cannot_tell_which_private_ids_exist(
    private: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(private)

    answers = {}
    for wid in (wf["workflow_id"], "no-such-flow"):
        answers[wid] = [
            (await private.get(f"/workflows/{wid}")).status,
            (await private.get(f"/api/workflows/{wid}")).status,
            (
                await private.get(f"/api/workflows/{wid}/updates", headers=UPGRADE)
            ).status,
            (await private.get(f"/api/workflows/{wid}/events")).status,
        ]

    assert answers[wf["workflow_id"]] == answers["no-such-flow"] == [401] * 4


async def test_private_workflow_is_open_to_admins_and_read_tokens(
    private: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(private)
    reader = await make_token(private, "dashboard", "read")

    api = await private.get(
        f"/api/workflows/{wf['workflow_id']}", headers=bearer(reader)
    )
    listing = await (await private.get("/api/workflows", headers=AUTH)).json()
    await sign_in(private)
    page = await private.get(f"/workflows/{wf['workflow_id']}")

    assert api.status == 200
    assert len(listing["workflows"]) == 1
    assert page.status == 200


async def test_share_link_opens_one_workflow_and_leaves_the_address_bar(
    private: TestClient[Any, Any], aiohttp_client: Any
) -> None:
    shared = await create_workflow(private, name="shared one")
    hidden = await create_workflow(private, name="hidden one")
    await sign_in(private)
    csrf = await csrf_from(private, f"/admin/workflows/{shared['workflow_id']}")
    made = await private.post(
        f"/admin/workflows/{shared['workflow_id']}/share", data={"csrf_token": csrf}
    )
    link = (await made.text()).split('data-field="share-url">')[1].split("<")[0]
    viewer = await aiohttp_client(private.server)

    assert link.startswith("http://127.0.0.1:")
    opened = await viewer.get("/" + link.split("/", 3)[3], allow_redirects=False)
    assert opened.status == 303
    assert opened.headers["Location"] == f"/workflows/{shared['workflow_id']}"

    page = await viewer.get(f"/workflows/{shared['workflow_id']}")
    other = await viewer.get(f"/workflows/{hidden['workflow_id']}")
    index = await (await viewer.get("/")).text()
    async with viewer.ws_connect(
        f"/api/workflows/{shared['workflow_id']}/updates"
    ) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"

    assert (page.status, other.status) == (200, 401)
    assert "shared one" in index and "hidden one" not in index


async def test_revoked_share_link_stops_working(
    private: TestClient[Any, Any], aiohttp_client: Any
) -> None:
    wf = await create_workflow(private)
    share = await make_token(private, "link", "read", wf["workflow_id"])
    viewer = await aiohttp_client(private.server)
    await viewer.get(f"/share/{share['token']}", allow_redirects=False)
    assert (await viewer.get(f"/workflows/{wf['workflow_id']}")).status == 200

    await private.delete(f"/api/tokens/{share['id']}", headers=AUTH)

    assert (await viewer.get(f"/workflows/{wf['workflow_id']}")).status == 401
    assert (await viewer.get(f"/share/{share['token']}")).status == 404


async def make_share_link(client: TestClient[Any, Any], workflow_id: str) -> str:
    csrf = await csrf_from(client, f"/admin/workflows/{workflow_id}")
    made = await client.post(
        f"/admin/workflows/{workflow_id}/share", data={"csrf_token": csrf}
    )
    assert made.status == 200, await made.text()
    return (await made.text()).split('data-field="share-url">')[1].split("<")[0]


async def test_share_links_can_still_be_made_after_one_is_revoked(
    private: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(private)
    await sign_in(private)
    await make_share_link(private, wf["workflow_id"])
    await make_share_link(private, wf["workflow_id"])
    listing = await (await private.get("/api/tokens", headers=AUTH)).json()
    first = next(t for t in listing["tokens"] if t["name"].startswith("share link 1"))

    await private.delete(f"/api/tokens/{first['id']}", headers=AUTH)
    third = await make_share_link(private, wf["workflow_id"])
    fourth = await make_share_link(private, wf["workflow_id"])

    assert third != fourth
    listing = await (await private.get("/api/tokens", headers=AUTH)).json()
    names = sorted(t["name"] for t in listing["tokens"])
    assert names == [f"share link {n} of {wf['workflow_id']}" for n in (2, 3, 4)]


# -- origins --------------------------------------------------------------------


async def test_socket_from_a_foreign_origin_is_refused_before_the_upgrade(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)

    response = await client.get(
        f"/api/workflows/{wf['workflow_id']}/updates",
        headers={**UPGRADE, "Origin": "https://evil.example"},
    )

    assert response.status == 403
    assert (await response.json())["error"]["field"] == "Origin"


async def test_socket_from_the_servers_own_origin_is_accepted(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    own = f"http://{client.host}:{client.port}"

    async with client.ws_connect(
        f"/api/workflows/{wf['workflow_id']}/updates", origin=own
    ) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"


async def test_socket_from_an_allowed_origin_is_accepted(app_factory: Any) -> None:
    client = await app_factory(allowed_origins="https://status.example.com")
    wf = await create_workflow(client)

    async with client.ws_connect(
        f"/api/workflows/{wf['workflow_id']}/updates",
        origin="https://status.example.com",
    ) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"


# -- limits ---------------------------------------------------------------------


async def test_body_over_the_limit_is_a_413_and_saves_nothing(app_factory: Any) -> None:
    client = await app_factory(max_body_bytes=2048)

    response = await client.post(
        "/api/workflows",
        json={"name": "big", "steps": ["a"], "message": "x" * 4000},
        headers=AUTH,
    )

    assert response.status == 413
    assert "2048 bytes" in (await response.json())["error"]["message"]
    assert (await (await client.get("/api/workflows")).json())["workflows"] == []


async def test_connections_past_the_per_address_limit_get_429(app_factory: Any) -> None:
    client = await app_factory(max_connections_per_address=3)
    wf = await create_workflow(client)
    url = f"/api/workflows/{wf['workflow_id']}/updates"
    sockets = [await client.ws_connect(url) for _ in range(3)]

    refused = await client.get(url, headers=UPGRADE)
    await sockets[0].close()
    await sockets[0].receive()

    assert refused.status == 429
    assert "at most 3" in (await refused.json())["error"]["message"]
    async with client.ws_connect(url) as again:
        assert (await again.receive_json(timeout=5))["type"] == "snapshot"
    for ws in sockets[1:]:
        await ws.close()


async def test_oversized_client_frame_closes_the_socket(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)

    async with client.ws_connect(f"/api/workflows/{wf['workflow_id']}/updates") as ws:
        await ws.receive_json(timeout=5)
        await ws.send_str("x" * 10_000)
        msg = await ws.receive(timeout=5)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)

    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_repeated_failed_sign_ins_are_slowed_down(
    client: TestClient[Any, Any],
) -> None:
    csrf = await csrf_from(client, "/admin/login")
    for _ in range(5):
        failed = await client.post(
            "/admin/login", data={"csrf_token": csrf, "token": "no"}
        )
        assert failed.status == 401

    slowed = await client.post(
        "/admin/login", data={"csrf_token": csrf, "token": "test-admin-token"}
    )

    assert slowed.status == 429
    assert int(slowed.headers["Retry-After"]) >= 1
    assert "too many failed sign-ins" in await slowed.text()


async def test_repeated_bad_bearer_tokens_are_slowed_down(
    client: TestClient[Any, Any],
) -> None:
    for _ in range(5):
        response = await client.post(
            "/api/workflows", json={}, headers={"Authorization": "Bearer vpr_guess"}
        )
        assert response.status == 401

    slowed = await client.post("/api/workflows", json={}, headers=AUTH)

    assert slowed.status == 429


# -- text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Déploiement 🚀", "مرحبا بالعالم", "部署完成", "a\u200fb", "tab\tand\nnewline"],
)
async def test_any_unicode_is_kept_exactly(
    client: TestClient[Any, Any], text: str
) -> None:
    wf = await create_workflow(client)

    response = await client.post(
        f"/api/workflows/{wf['workflow_id']}/message",
        json={"message": text},
        headers=AUTH,
    )

    assert response.status == 200
    assert (await response.json())["message"] == text


@pytest.mark.parametrize(
    "raw", ['"bell \\u0007"', '"lone \\ud800 half"', '"esc \\u001b[31m"']
)
async def test_control_characters_and_lone_surrogates_are_a_400(
    client: TestClient[Any, Any], raw: str
) -> None:
    wf = await create_workflow(client)

    response = await client.post(
        f"/api/workflows/{wf['workflow_id']}/message",
        data='{"message": ' + raw + "}",
        headers={**AUTH, "Content-Type": "application/json"},
    )

    assert response.status == 400
    assert (await response.json())["error"]["field"] == "message"
    state = await (await client.get(f"/api/workflows/{wf['workflow_id']}")).json()
    assert state["seq"] == 1


def test_backup_refuses_to_overwrite(tmp_path: Path) -> None:
    from vapora.backup import backup

    (tmp_path / "db").write_bytes(b"")
    (tmp_path / "copy").write_text("keep me")

    with pytest.raises(FileExistsError):
        backup(tmp_path / "db", tmp_path / "copy")
    assert (tmp_path / "copy").read_text() == "keep me"


async def test_a_sign_in_cookie_reads_the_api_but_changes_nothing(
    private: TestClient[Any, Any],
) -> None:
    await sign_in(private)
    wf = await create_workflow(private)
    body = {"name": "admin", "scope": "admin"}

    read = await private.get(f"/api/workflows/{wf['workflow_id']}")
    # What a page on another site could make a signed-in browser send.
    created = await private.post(
        "/api/workflows",
        data='{"name": "x", "steps": ["a"]}',
        headers={"Content-Type": "text/plain"},
    )
    token = await private.post("/api/tokens", json=body)
    hook = await private.post("/api/webhooks", json={"url": "http://127.0.0.1:9/"})
    advanced = await private.post(f"/api/workflows/{wf['workflow_id']}/advance")

    assert read.status == 200
    assert [r.status for r in (created, token, hook, advanced)] == [401] * 4
    listing = await (await private.get("/api/workflows")).json()
    assert [w["workflow_id"] for w in listing["workflows"]] == [wf["workflow_id"]]
    assert (await (await private.get("/api/tokens")).json())["tokens"] == []


@pytest.mark.parametrize(
    ("new_token", "still_signed_in"), [(None, True), ("a-new-admin-token", False)]
)
async def test_changing_the_admin_token_signs_every_browser_out(
    app_factory: Any, new_token: str | None, still_signed_in: bool
) -> None:
    old_node = await app_factory()
    # A node already on the new token, beside one still on the old: a rolling
    # change, where a browser signs in on the old node after the new one started.
    new_node = await app_factory(**({"admin_token": new_token} if new_token else {}))
    await sign_in(old_node)
    cookie = old_node.session.cookie_jar.filter_cookies(old_node.make_url("/"))
    session = cookie["vapora_session"].value

    admin = await new_node.get(
        "/admin", cookies={"vapora_session": session}, allow_redirects=False
    )

    assert (admin.status == 200) is still_signed_in
    if not still_signed_in:
        assert admin.headers["Location"] == "/admin/login"


async def raw_status(client: TestClient[Any, Any], request: bytes) -> int:
    """Send request as raw bytes; return the answer's status code."""
    reader, writer = await asyncio.open_connection(
        client.server.host, client.server.port
    )
    writer.write(request)
    async with asyncio.timeout(10):
        status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_header_and_cookie_bytes_that_are_not_utf8_are_refused_cleanly(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    wf = await create_workflow(client)
    head = b"Host: x\r\nContent-Length: 0\r\n"

    bearer = await raw_status(
        client,
        f"POST /api/workflows/{wf['workflow_id']}/advance HTTP/1.1\r\n".encode()
        + head
        + b"Authorization: Bearer caf\xe9\r\n\r\n",
    )
    csrf = await raw_status(
        client,
        b"GET /admin/login HTTP/1.1\r\n"
        + head
        + b"Cookie: vapora_csrf=caf\xe9\r\n\r\n",
    )
    session = await raw_status(
        client,
        b"GET /admin HTTP/1.1\r\n" + head + b"Cookie: vapora_session=caf\xe9\r\n\r\n",
    )

    assert (bearer, csrf, session) == (401, 200, 303)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_read_token_answers_only_gates_it_may_read(
    client: TestClient[Any, Any],
) -> None:
    steps = [{"name": "ship", "gate": {"approvers": ["alice"]}}]
    ids = []
    for _ in range(2):
        made = await client.post(
            "/api/workflows", json={"name": "r", "steps": steps}, headers=AUTH
        )
        ids.append((await made.json())["workflow_id"])
        await client.post(f"/api/workflows/{ids[-1]}/advance", headers=AUTH)
    alice = await make_token(client, "alice", "read", ids[1])
    body = {"decision": "approve", "comment": "ok"}

    other = await client.post(
        f"/api/workflows/{ids[0]}/gate", json=body, headers=bearer(alice)
    )
    own = await client.post(
        f"/api/workflows/{ids[1]}/gate", json=body, headers=bearer(alice)
    )

    assert (other.status, own.status) == (403, 200)
