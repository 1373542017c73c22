"""The admin pages: sign-in, CSRF, form validation and POST-redirect-GET."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient

from .conftest import ADMIN_TOKEN, AUTH, create_workflow

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


async def csrf_from(client: TestClient[Any, Any], path: str) -> str:
    response = await client.get(path)
    assert response.status == 200, path
    match = CSRF.search(await response.text())
    assert match, f"no CSRF token on {path}"
    return match.group(1)


async def sign_in(client: TestClient[Any, Any]) -> None:
    token = await csrf_from(client, "/admin/login")
    response = await client.post(
        "/admin/login",
        data={"csrf_token": token, "token": ADMIN_TOKEN},
        allow_redirects=False,
    )
    assert response.status == 303
    assert response.headers["Location"] == "/admin"


async def test_admin_needs_a_sign_in(client: TestClient[Any, Any]) -> None:
    response = await client.get("/admin", allow_redirects=False)

    assert response.status == 303
    assert response.headers["Location"] == "/admin/login"


async def test_sign_in_sets_a_safe_session_cookie(client: TestClient[Any, Any]) -> None:
    token = await csrf_from(client, "/admin/login")

    response = await client.post(
        "/admin/login",
        data={"csrf_token": token, "token": ADMIN_TOKEN},
        allow_redirects=False,
    )

    cookie = response.cookies["vapora_session"]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Lax"
    assert (await client.get("/admin")).status == 200


async def test_wrong_admin_token_re_renders_the_form(
    client: TestClient[Any, Any],
) -> None:
    token = await csrf_from(client, "/admin/login")

    response = await client.post(
        "/admin/login",
        data={"csrf_token": token, "token": "guess"},
        allow_redirects=False,
    )

    assert response.status == 401
    assert "That is not the admin token." in await response.text()
    assert "vapora_session" not in response.cookies


async def test_form_without_csrf_token_is_refused(client: TestClient[Any, Any]) -> None:
    await sign_in(client)

    response = await client.post(
        "/admin/workflows", data={"name": "x", "steps": "a"}, allow_redirects=False
    )

    assert response.status == 403
    assert "form has expired" in await response.text()
    assert (await (await client.get("/api/workflows")).json())["workflows"] == []


async def test_csrf_token_from_another_browser_is_refused(
    client: TestClient[Any, Any], aiohttp_client: Any
) -> None:
    await sign_in(client)
    stranger = await aiohttp_client(client.server)
    foreign_token = await csrf_from(stranger, "/admin/login")

    response = await client.post(
        "/admin/workflows",
        data={"csrf_token": foreign_token, "name": "x", "steps": "a"},
        allow_redirects=False,
    )

    assert response.status == 403


async def test_create_form_redirects_to_the_new_workflow(
    client: TestClient[Any, Any],
) -> None:
    await sign_in(client)
    token = await csrf_from(client, "/admin")

    response = await client.post(
        "/admin/workflows",
        data={
            "csrf_token": token,
            "name": "Release 2.0",
            "steps": "build\n\ntest\nship\n",
        },
        allow_redirects=False,
    )

    assert response.status == 303
    workflows = (await (await client.get("/api/workflows")).json())["workflows"]
    assert [w["name"] for w in workflows] == ["Release 2.0"]
    assert [s["name"] for s in workflows[0]["steps"]] == ["build", "test", "ship"]
    assert (
        response.headers["Location"]
        == f"/admin/workflows/{workflows[0]['workflow_id']}"
    )


async def test_create_form_with_a_bad_field_shows_why_and_saves_nothing(
    client: TestClient[Any, Any],
) -> None:
    await sign_in(client)
    token = await csrf_from(client, "/admin")

    response = await client.post(
        "/admin/workflows",
        data={"csrf_token": token, "name": "Kept name", "steps": "  \n"},
    )

    assert response.status == 400
    html = await response.text()
    assert 'id="create-steps-error"' in html
    assert "at least one step" in html
    assert 'value="Kept name"' in html
    assert (await (await client.get("/api/workflows")).json())["workflows"] == []


async def test_advance_form_changes_the_workflow(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client)
    await sign_in(client)
    page = f"/admin/workflows/{wf['workflow_id']}"
    token = await csrf_from(client, page)

    response = await client.post(
        f"{page}/advance",
        data={"csrf_token": token, "message": "go"},
        allow_redirects=False,
    )

    assert response.status == 303
    assert response.headers["Location"] == f"{page}?done=advance"
    state = await (await client.get(f"/api/workflows/{wf['workflow_id']}")).json()
    assert (state["current_step"], state["message"]) == (1, "go")
    assert state["history"][0]["actor"] == "admin"


async def test_status_form_refusal_is_shown_beside_the_form(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client, steps=1)
    await sign_in(client)
    page = f"/admin/workflows/{wf['workflow_id']}"
    token = await csrf_from(client, page)
    await client.post(
        f"{page}/status", data={"csrf_token": token, "status": "cancelled"}
    )

    response = await client.post(f"{page}/advance", data={"csrf_token": token})

    assert response.status == 409
    assert "reopen it first" in await response.text()
    state = await (await client.get(f"/api/workflows/{wf['workflow_id']}")).json()
    assert (state["status"], state["seq"]) == ("cancelled", 2)


async def test_refusals_of_a_form_no_longer_shown_still_say_why(
    client: TestClient[Any, Any],
) -> None:
    made = await client.post(
        "/api/workflows",
        json={"name": "Release", "steps": [{"name": "ship", "gate": True}]},
        headers=AUTH,
    )
    wid = (await made.json())["workflow_id"]
    await client.post(f"/api/workflows/{wid}/advance", headers=AUTH)
    await sign_in(client)
    page = f"/admin/workflows/{wid}"
    token = await csrf_from(client, page)

    bad_decision = await client.post(
        f"{page}/gate", data={"csrf_token": token, "decision": "maybe", "comment": "x"}
    )
    await client.post(
        f"/api/workflows/{wid}/gate",
        json={"decision": "approve", "comment": "from another admin"},
        headers=AUTH,
    )
    too_late = await client.post(
        f"{page}/gate", data={"csrf_token": token, "decision": "reject", "comment": "x"}
    )
    await client.post(
        f"/api/workflows/{wid}/status",
        json={"status": "running", "reopen": True},
        headers=AUTH,
    )
    not_finished = await client.post(f"{page}/reopen", data={"csrf_token": token})

    assert bad_decision.status == 400
    assert "decision must be" in await bad_decision.text()
    assert too_late.status == 409
    assert "no step is waiting for an answer" in await too_late.text()
    assert not_finished.status == 409
    assert "not finished" in await not_finished.text()


async def test_reset_needs_its_confirmation(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client)
    await sign_in(client)
    page = f"/admin/workflows/{wf['workflow_id']}"
    token = await csrf_from(client, page)
    await client.post(f"{page}/advance", data={"csrf_token": token})

    refused = await client.post(f"{page}/reset", data={"csrf_token": token})
    done = await client.post(
        f"{page}/reset",
        data={"csrf_token": token, "confirm": "yes"},
        allow_redirects=False,
    )

    assert refused.status == 400
    assert 'id="reset-confirm-error"' in await refused.text()
    assert done.status == 303
    state = await (await client.get(f"/api/workflows/{wf['workflow_id']}")).json()
    assert (state["current_step"], state["status"]) == (0, "pending")


async def test_sign_out_ends_the_session(client: TestClient[Any, Any]) -> None:
    await sign_in(client)
    token = await csrf_from(client, "/admin")

    await client.post(
        "/admin/logout", data={"csrf_token": token}, allow_redirects=False
    )

    assert (await client.get("/admin", allow_redirects=False)).status == 303


async def test_pages_escape_markup(client: TestClient[Any, Any]) -> None:
    wf = await create_workflow(client, name="<script>alert(1)</script>")

    html = await (await client.get(f"/workflows/{wf['workflow_id']}")).text()

    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_unknown_workflow_page_is_a_404_page(
    client: TestClient[Any, Any],
) -> None:
    response = await client.get("/workflows/nope")

    assert response.status == 404
    assert response.content_type == "text/html"
    assert "no workflow with id" in await response.text()
