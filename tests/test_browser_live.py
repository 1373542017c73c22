"""The live client in headless Chromium when things go wrong or get interesting.

Races at load, blocked WebSockets, a frozen server, a wrong clock, gates
answered from another page, presence, notifications and a base path. Every
test runs real `vapora serve` processes on 127.0.0.1 and waits on page events
through Playwright's expect(), never on fixed sleeps.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Frame, Page, Route, WebSocketRoute, expect

from .browser_fixtures import (  # noqa: F401
    LIVE_TIMEOUT_MS,
    Pages,
    api,
    browser_fixture,
    expect_live,
    field,
    pages_fixture,
    sign_in,
)
from .conftest import ServerProcess

StartServer = Callable[..., ServerProcess]

# The client retries with jittered backoff; a few rounds fit in this.
RECONNECT_TIMEOUT_MS = 15_000
LOST = re.compile(r"^(reconnecting|offline)$")

RECORD_FRESHNESS = """() => {
  window.__freshness = [];
  const el = document.querySelector("[data-field=freshness]");
  new MutationObserver(() => window.__freshness.push(el.dataset.state))
    .observe(el, { attributes: true, attributeFilter: ["data-state"] });
}"""


def new_workflow(base_url: str, name: str, steps: list[Any]) -> str:
    """Create a workflow through the API and return its id."""
    workflow = api(base_url, "/api/workflows", {"name": name, "steps": steps})
    return str(workflow["workflow_id"])


def main_frame_navigations(page: Page) -> list[str]:
    """Collect every navigation of page's main frame from now on."""
    seen: list[str] = []

    def on_navigated(frame: Frame) -> None:
        if frame == page.main_frame:
            seen.append(frame.url)

    page.on("framenavigated", on_navigated)
    return seen


@pytest.mark.browser
def test_change_between_render_and_socket_open_shows_on_the_page(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process()
    workflow_id = new_workflow(server.url, "Deploy web", ["build", "ship"])
    path = f"/api/workflows/{workflow_id}/message"
    changed: list[int] = []

    def change_then_load(route: Route) -> None:
        # The page is rendered (it asked for its script) but has no socket yet.
        changed.append(api(server.url, path, {"message": "Late news"})["seq"])
        route.continue_()

    page = pages.context().new_page()
    page.on("pageerror", lambda error: pages.errors.append(str(error)))
    page.route(re.compile(r"/static/vapora\.js"), change_then_load)
    navigations = main_frame_navigations(page)
    response = page.goto(f"{server.url}/workflows/{workflow_id}")

    assert response is not None
    assert "Late news" not in response.text()
    assert changed == [2]
    assert page.evaluate("document.body.dataset.seq") == "1"
    expect(field(page, "message")).to_have_text("Late news", timeout=LIVE_TIMEOUT_MS)
    expect(field(page, "seq")).to_have_text("2")
    expect_live(page)
    assert page.evaluate("window.vapora.seq") == 2

    # It subscribed from the seq it was rendered with and was sent the change.
    received = page.evaluate("window.__received")
    changes = [f for f in received if f["type"] in ("update", "snapshot")]
    assert [(f["type"], f["seq"]) for f in changes] == [("update", 2)], received
    assert parse_qs(urlsplit(changes[0]["url"]).query)["after"] == ["1"]
    assert len(navigations) == 1, navigations
    pages.assert_clean()


@pytest.mark.browser
def test_blocked_websocket_falls_back_to_the_event_stream(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process()
    workflow_id = new_workflow(server.url, "Nightly build", ["compile", "test"])
    refused: list[str] = []

    def refuse(socket: WebSocketRoute) -> None:
        refused.append(socket.url)
        socket.close()

    page = pages.context().new_page()
    page.on("pageerror", lambda error: pages.errors.append(str(error)))
    page.route_web_socket(re.compile(r"/api/workflows/[^/]+/updates"), refuse)
    page.goto(f"{server.url}/workflows/{workflow_id}")

    freshness = field(page, "freshness")
    expect_live(page, timeout=RECONNECT_TIMEOUT_MS)
    expect(freshness).to_contain_text("fallback")
    assert page.evaluate("window.vapora.transport") == "sse"
    assert len(refused) >= 2, refused

    api(server.url, f"/api/workflows/{workflow_id}/advance", {"message": "Compiling"})
    expect(field(page, "step_label")).to_have_text(
        "Step 1 of 2", timeout=LIVE_TIMEOUT_MS
    )
    expect(field(page, "message")).to_have_text("Compiling")
    received = page.evaluate("window.__received")
    assert {"via": "sse", "type": "update", "seq": 2} in [
        {k: f[k] for k in ("via", "type", "seq")} for f in received
    ], received
    expect(freshness).to_have_attribute("data-state", "live")
    pages.assert_clean()


@pytest.mark.browser
def test_frozen_server_is_noticed_and_the_page_recovers_by_itself(
    server_process: StartServer, pages: Pages
) -> None:
    # Silence longer than 2.5 heartbeats plus 2 s, here 3.25 s, is a dead link.
    server = server_process("--heartbeat-s", "0.5")
    workflow_id = new_workflow(server.url, "Backup", ["dump", "upload"])
    page = pages.open(f"{server.url}/workflows/{workflow_id}")
    expect_live(page)
    page.evaluate(RECORD_FRESHNESS)
    freshness = field(page, "freshness")

    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        expect(freshness).to_have_attribute("data-state", LOST, timeout=10_000)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)

    expect_live(page, timeout=RECONNECT_TIMEOUT_MS)
    states = page.evaluate("window.__freshness")
    assert states[-1] == "live" and any(LOST.match(s) for s in states), states

    api(server.url, f"/api/workflows/{workflow_id}/message", {"message": "Thawed"})
    expect(field(page, "message")).to_have_text("Thawed", timeout=LIVE_TIMEOUT_MS)
    pages.assert_clean()


RELATIVE = re.compile(r"^(just now|\d+ s ago)$")


@pytest.mark.browser
@pytest.mark.parametrize(
    "clock_off", [timedelta(hours=1), timedelta(hours=-1)], ids=["ahead", "behind"]
)
def test_relative_times_hold_when_the_viewer_clock_is_off(
    server_process: StartServer, pages: Pages, clock_off: timedelta
) -> None:
    server = server_process()
    workflow_id = new_workflow(server.url, "Report", ["gather", "send"])
    context = pages.context()
    context.clock.install(time=datetime.now(UTC) + clock_off)

    listing = pages.open(f"{server.url}/", context)
    expect_live(listing)
    item = listing.locator(f'[data-workflow-id="{workflow_id}"]')
    changed = item.locator("time[data-relative=yes]")
    expect(changed).to_have_text(RELATIVE)

    viewer = pages.open(f"{server.url}/workflows/{workflow_id}", context)
    expect_live(viewer)
    expect(viewer.locator(".changed time[data-relative=yes]")).to_have_text(RELATIVE)

    # A live change renders its time through the same offset.
    api(server.url, f"/api/workflows/{workflow_id}/advance", {})
    expect(field(item, "step_label")).to_have_text(
        "Step 1 of 2", timeout=LIVE_TIMEOUT_MS
    )
    expect(changed).to_have_text(RELATIVE)
    expect(field(viewer, "step_label")).to_have_text(
        "Step 1 of 2", timeout=LIVE_TIMEOUT_MS
    )
    expect(viewer.locator(".changed time[data-relative=yes]")).to_have_text(RELATIVE)
    pages.assert_clean()


ICON_HREF = "document.querySelector('link[rel=icon]')?.getAttribute('href') ?? null"


@pytest.mark.browser
def test_gate_answered_by_an_admin_shows_live_on_the_workflow_page(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process()
    steps = ["build", {"name": "ship", "gate": {"approvers": ["alice"]}}]
    workflow_id = new_workflow(server.url, "Release 2.0", steps)
    for _ in range(2):
        api(server.url, f"/api/workflows/{workflow_id}/advance", {})

    viewer = pages.open(f"{server.url}/workflows/{workflow_id}")
    expect_live(viewer)
    gate = field(viewer, "gate")
    expect(gate).to_be_visible()
    expect(gate).to_contain_text("alice or an admin")
    expect(field(viewer, "status_label")).to_have_text("Waiting for a person")
    icon_before = viewer.evaluate(ICON_HREF)
    navigations = main_frame_navigations(viewer)

    admin = sign_in(pages, server.url)
    admin.goto(f"{server.url}/admin/workflows/{workflow_id}")
    admin.fill("#gate-comment", "Looks good")
    admin.locator("button[name=decision][value=approve]").click()
    expect(admin.get_by_role("status").filter(has_text="Saved.")).to_be_visible()

    expect(field(viewer, "status_label")).to_have_text(
        "Completed", timeout=LIVE_TIMEOUT_MS
    )
    expect(gate).to_be_hidden()
    ship = field(viewer, "steps").locator("li").nth(1)
    expect(ship.locator(".step-note")).to_have_text("approved by admin: Looks good")
    expect(ship).to_have_attribute("data-state", "done")
    expect(viewer).to_have_title(re.compile(r"^\(Completed\) "))
    icon_after = viewer.evaluate(ICON_HREF)
    assert icon_after is not None and icon_after.startswith("data:"), icon_after
    assert icon_after != icon_before
    expect(field(viewer, "announce")).to_contain_text("Completed")
    assert navigations == []
    pages.assert_clean()


@pytest.mark.browser
def test_pages_show_how_many_watch_the_workflow(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process("--presence-interval-s", "0.2")
    workflow_id = new_workflow(server.url, "Migration", ["copy", "switch"])
    url = f"{server.url}/workflows/{workflow_id}"

    first = pages.open(url)
    expect(field(first, "watching")).to_have_text("1", timeout=LIVE_TIMEOUT_MS)
    second = pages.open(url)
    expect(field(second, "watching")).to_have_text("2", timeout=LIVE_TIMEOUT_MS)
    expect(field(first, "watching")).to_have_text("2", timeout=LIVE_TIMEOUT_MS)

    pages.assert_clean()
    second.close()
    expect(field(first, "watching")).to_have_text("1", timeout=LIVE_TIMEOUT_MS)


def notification_stub(permission: str) -> str:
    """Replace window.Notification with one that records what it is asked to show."""
    return f"""
(() => {{
  window.__notifications = [];
  window.Notification = class {{
    constructor(title, options) {{
      window.__notifications.push({{ title, body: (options || {{}}).body }});
    }}
    static get permission() {{
      return "{permission}";
    }}
    static requestPermission() {{
      return Promise.resolve("{permission}");
    }}
  }};
}})();
"""


@pytest.mark.browser
def test_failure_notifies_only_those_who_allowed_notifications(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process()
    workflow_id = new_workflow(server.url, "Nightly import", ["fetch", "load"])
    url = f"{server.url}/workflows/{workflow_id}"
    allowed = pages.context()
    allowed.grant_permissions(["notifications"], origin=server.url)
    allowed.add_init_script(notification_stub("granted"))
    not_asked = pages.context()
    not_asked.add_init_script(notification_stub("default"))

    watcher = pages.open(url, allowed)
    bystander = pages.open(url, not_asked)
    for page in (watcher, bystander):
        expect_live(page)
    expect(field(watcher, "notify")).to_be_hidden()
    expect(field(bystander, "notify")).to_be_visible()

    api(server.url, f"/api/workflows/{workflow_id}/status", {"status": "failed"})
    for page in (watcher, bystander):
        expect(field(page, "status_label")).to_have_text(
            "Failed", timeout=LIVE_TIMEOUT_MS
        )

    expect(field(watcher, "announce")).to_contain_text("Failed")
    shown = watcher.evaluate("window.__notifications")
    assert len(shown) == 1, shown
    assert "Nightly import" in shown[0]["title"] and "Failed" in shown[0]["title"]
    assert bystander.evaluate("window.__notifications") == []
    pages.assert_clean()


@pytest.mark.browser
def test_page_under_a_base_path_goes_live(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process("--base-path", "/vapora")
    base = f"{server.url}/vapora"
    workflow_id = new_workflow(base, "Proxied deploy", ["build", "ship"])

    page = pages.open(f"{base}/workflows/{workflow_id}")
    expect_live(page)
    api(base, f"/api/workflows/{workflow_id}/message", {"message": "Behind nginx"})
    expect(field(page, "message")).to_have_text("Behind nginx", timeout=LIVE_TIMEOUT_MS)
    received = page.evaluate("window.__received")
    assert all(urlsplit(f["url"]).path.startswith("/vapora/") for f in received)
    pages.assert_clean()


@pytest.mark.browser
def test_page_with_estimates_from_past_runs_goes_live(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process()
    steps = ["build", "ship \"prod\" & 'co' <now>"]
    done = new_workflow(server.url, "Nightly", steps)
    for _ in steps:
        api(server.url, f"/api/workflows/{done}/advance", {})
    api(server.url, f"/api/workflows/{done}/advance", {})
    workflow_id = new_workflow(server.url, "Nightly", steps)
    api(server.url, f"/api/workflows/{workflow_id}/advance", {})

    page = pages.open(f"{server.url}/workflows/{workflow_id}")
    expect_live(page)
    api(server.url, f"/api/workflows/{workflow_id}/message", {"message": "Tonight"})

    expect(field(page, "message")).to_have_text("Tonight", timeout=LIVE_TIMEOUT_MS)
    expect(page.locator("body")).not_to_have_attribute("hidden", re.compile(".*"))
    assert page.evaluate("Object.keys(JSON.parse(document.body.dataset.medians))") == [
        "build",
        steps[1],
    ]
    pages.assert_clean()
