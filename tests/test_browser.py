"""The live pages in headless Chromium: updates, reconnection, escaping, the list.

Every test runs real `vapora serve` processes on 127.0.0.1 and waits on page
events through Playwright's expect(), never on fixed sleeps.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, expect

from .browser_fixtures import (  # noqa: F401
    LIVE_TIMEOUT_MS,
    Pages,
    api,
    browser_fixture,
    expect_live,
    field,
    free_port,
    pages_fixture,
    sign_in,
)
from .conftest import ServerProcess

StartServer = Callable[..., ServerProcess]
RecordProperty = Callable[[str, object], None]

# The client retries with jittered backoff capped at 15 s.
RECONNECT_TIMEOUT_MS = 25_000

LOST = re.compile(r"^(reconnecting|offline)$")

WATCH_STEP_LABEL = """() => {
  window.__stepChangedAt = null;
  const el = document.querySelector("[data-field=step_label]");
  new MutationObserver(() => {
    if (window.__stepChangedAt === null) window.__stepChangedAt = Date.now();
  }).observe(el, { childList: true, characterData: true, subtree: true });
}"""

# Kept in sessionStorage, which outlives the navigation the form causes.
NOTE_SUBMIT = """() => {
  sessionStorage.removeItem("submittedAt");
  document.getElementById("advance-form").addEventListener("submit", () => {
    sessionStorage.setItem("submittedAt", String(Date.now()));
  });
}"""

RECORD_FRESHNESS = """() => {
  window.__freshness = [];
  const el = document.querySelector("[data-field=freshness]");
  new MutationObserver(() => window.__freshness.push(el.dataset.state))
    .observe(el, { attributes: true, attributeFilter: ["data-state"] });
}"""


class Timing(NamedTuple):
    """Milliseconds from an admin's submit to the viewer showing the change.

    around: measured in the test around the click and the expectation, which
    includes Playwright's own work and polling. from_click and from_submit:
    from just before the click, and from the form's submit event, to the
    viewer's DOM change as a MutationObserver saw it (same machine clock).
    """

    around: float
    from_click: float
    from_submit: float


class StaysLoaded:
    """Checks that a page is never reloaded nor navigated away."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.navigations: list[str] = []
        page.evaluate("window.__marker = 1")
        page.on("framenavigated", self._on_navigated)

    def _on_navigated(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self.navigations.append(frame.url)

    def check(self) -> None:
        assert self.page.evaluate("window.__marker") == 1
        assert self.navigations == []


def create_workflow(
    base_url: str, name: str, steps: list[str], message: str = ""
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "steps": steps}
    if message:
        body["message"] = message
    return api(base_url, "/api/workflows", body)


def submit_advance(admin: Page, viewer: Page, expected_step: str) -> Timing:
    """Submit the admin's advance form and time until the viewer shows it."""
    viewer.evaluate(WATCH_STEP_LABEL)
    admin.evaluate(NOTE_SUBMIT)
    wall_start_ms = time.time() * 1000
    start = time.perf_counter()
    admin.locator("#advance-form button[type=submit]").click()
    expect(field(viewer, "step_label")).to_have_text(
        expected_step, timeout=LIVE_TIMEOUT_MS
    )
    around_ms = (time.perf_counter() - start) * 1000
    changed_at = viewer.evaluate("window.__stepChangedAt")
    submitted_at = admin.evaluate("Number(sessionStorage.getItem('submittedAt'))")
    assert changed_at is not None and submitted_at
    return Timing(around_ms, changed_at - wall_start_ms, changed_at - submitted_at)


@pytest.mark.browser
def test_admin_advance_appears_live_on_the_workflow_page(
    server_process: StartServer, pages: Pages, record_property: RecordProperty
) -> None:
    server = server_process()
    workflow = create_workflow(server.url, "Deploy web", ["build", "test", "ship"])
    workflow_id = workflow["workflow_id"]

    viewer = pages.open(f"{server.url}/workflows/{workflow_id}")
    expect_live(viewer)
    expect(field(viewer, "step_label")).to_have_text("Not started · 3 steps")
    expect(field(viewer, "status_label")).to_have_text("Pending")
    history = field(viewer, "history").locator("tr")
    expect(history).to_have_count(1)
    loaded = StaysLoaded(viewer)

    admin = sign_in(pages, server.url)
    admin.goto(f"{server.url}/admin/workflows/{workflow_id}")
    admin.fill("#advance-message", "Building on runner 7")
    first = submit_advance(admin, viewer, "Step 1 of 3")

    expect(field(viewer, "message")).to_have_text("Building on runner 7")
    expect(field(viewer, "status_label")).to_have_text("Running")
    expect(field(viewer, "status")).to_have_attribute("data-status", "running")
    progress = field(viewer, "progress")
    expect(progress).to_have_attribute("aria-valuenow", "0")
    expect(progress).to_have_attribute("aria-valuetext", "Step 1 of 3, 0%")
    expect(field(viewer, "seq")).to_have_text("2")
    expect(history).to_have_count(2)
    newest = history.first
    expect(newest).to_have_attribute("data-seq", "2")
    expect(newest.locator("td").nth(1)).to_have_text("admin")
    expect(newest.locator("td").nth(2)).to_have_text(
        "Step 1 of 3: build — Building on runner 7"
    )
    steps = field(viewer, "steps").locator("li")
    expect(steps.nth(0)).to_have_attribute("data-state", "running")
    expect(steps.nth(1)).to_have_attribute("data-state", "pending")

    # The admin's own page came back re-rendered after the redirect.
    expect(admin.get_by_role("status").filter(has_text="Saved.")).to_be_visible()
    expect(admin.locator(".summary [data-field=step_label]")).to_have_text(
        "Step 1 of 3"
    )

    admin.fill("#advance-message", "Tests running")
    second = submit_advance(admin, viewer, "Step 2 of 3")
    expect(progress).to_have_attribute("aria-valuenow", "33")
    expect(field(viewer, "percent")).to_have_text("33")
    expect(field(viewer, "message")).to_have_text("Tests running")
    expect(history).to_have_count(3)
    expect(history.first).to_have_attribute("data-seq", "3")
    expect(steps.nth(0)).to_have_attribute("data-state", "done")
    expect(steps.nth(1)).to_have_attribute("data-state", "running")

    assert (
        viewer.evaluate("window.vapora.seq")
        == api(server.url, f"/api/workflows/{workflow_id}")["seq"]
    )
    loaded.check()
    pages.assert_clean()

    for n, timing in enumerate([first, second], start=1):
        print(
            f"\nsubmit-to-display, advance {n}: {timing.around:.1f} ms around click "
            f"and expect; in the pages: {timing.from_click:.0f} ms from click, "
            f"{timing.from_submit:.0f} ms from the submit event"
        )
        for name, value in timing._asdict().items():
            record_property(f"advance_{n}_{name}_ms", round(value, 1))


@pytest.mark.browser
def test_page_reconnects_by_itself_and_shows_what_it_missed(
    server_process: StartServer, pages: Pages, record_property: RecordProperty
) -> None:
    port = free_port()
    first = server_process("--port", str(port))
    assert first.url == f"http://127.0.0.1:{port}"
    workflow = create_workflow(
        first.url, "Nightly build", ["compile", "test", "publish"]
    )
    workflow_id = workflow["workflow_id"]
    api(first.url, f"/api/workflows/{workflow_id}/advance", {"message": "Compiling"})

    viewer = pages.open(f"{first.url}/workflows/{workflow_id}")
    expect_live(viewer)
    expect(field(viewer, "step_label")).to_have_text("Step 1 of 3")
    viewer.evaluate(RECORD_FRESHNESS)
    loaded = StaysLoaded(viewer)
    seq_before = viewer.evaluate("window.vapora.seq")
    assert seq_before == 2
    heard_before = viewer.evaluate("window.__received.length")

    # The server goes away: SIGTERM closes every socket with 1001.
    assert first.stop() == 0
    freshness = field(viewer, "freshness")
    expect(freshness).to_have_attribute("data-state", LOST, timeout=LIVE_TIMEOUT_MS)
    assert 1001 in viewer.evaluate("window.__socketCloses")

    # While the viewer is cut off, another server on the same database moves on.
    other = server_process()
    assert other.url != first.url
    api(other.url, f"/api/workflows/{workflow_id}/advance", {"message": "Testing"})
    assert other.stop() == 0
    assert field(viewer, "step_label").text_content() == "Step 1 of 3"
    assert freshness.get_attribute("data-state") in ("reconnecting", "offline")

    again = server_process("--port", str(port))
    assert again.url == first.url
    back_at = time.perf_counter()
    expect_live(viewer, timeout=RECONNECT_TIMEOUT_MS)
    reconnect_s = time.perf_counter() - back_at

    expect(field(viewer, "step_label")).to_have_text("Step 2 of 3")
    expect(field(viewer, "message")).to_have_text("Testing")
    expect(field(viewer, "status_label")).to_have_text("Running")
    expect(field(viewer, "progress")).to_have_attribute("aria-valuenow", "33")
    history = field(viewer, "history").locator("tr")
    expect(history).to_have_count(3)
    expect(history.first).to_have_attribute("data-seq", "3")
    expect(history.first.locator("td").nth(2)).to_have_text(
        "Step 2 of 3: test — Testing"
    )
    assert viewer.evaluate("window.vapora.seq") == 3

    # It resumed from the seq it had, on the same database, by whichever
    # transport it came back on, and was sent the missed change rather than
    # a fresh snapshot.
    received = viewer.evaluate("window.__received")[heard_before:]
    changes = [f for f in received if f["type"] in ("update", "snapshot")]
    assert changes, received
    resumed = changes[0]
    assert (resumed["type"], resumed["seq"]) == ("update", 3), received
    url = urlsplit(resumed["url"])
    query = parse_qs(url.query)
    assert url.port == port
    assert query["after"] == [str(seq_before)]
    assert query["epoch"] == [workflow_epoch(viewer)]
    transport = viewer.evaluate("window.vapora.transport")
    assert transport == resumed["via"]

    states = viewer.evaluate("window.__freshness")
    assert states[-1] == "live", states
    assert len(states) >= 2 and all(LOST.match(s) for s in states[:-1]), states
    loaded.check()
    pages.assert_clean()

    print(
        f"\nlive again {reconnect_s:.2f} s after the server was back up, "
        f"over {transport}"
    )
    record_property("reconnect_after_restart_s", round(reconnect_s, 2))


def workflow_epoch(page: Page) -> str:
    epoch = page.evaluate("document.body.dataset.epoch")
    assert isinstance(epoch, str) and epoch
    return epoch


MARKUP = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
MARKUP_LIVE = (
    '<svg onload="window.__pwned=2"></svg><i>it</i> & "quoted" <script>x</script>'
)
NAME = "Release <b>1.0</b>"


def assert_literal(root: Page, name: str, text: str) -> None:
    element = field(root, name)
    expect(element).to_have_count(1)
    assert element.text_content() == text
    assert element.locator("*").count() == 0


@pytest.mark.browser
def test_markup_in_messages_is_shown_as_text(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process()
    workflow = create_workflow(server.url, NAME, ["one", "two"], message=MARKUP)
    url = f"{server.url}/workflows/{workflow['workflow_id']}"

    # As the server renders it: the live client, which would rewrite the
    # text, does not run here.
    static = pages.open(url, javascript=False)
    expect(field(static, "freshness")).to_have_attribute("data-state", "static")
    assert_literal(static, "message", MARKUP)
    assert_literal(static, "name", NAME)
    assert static.title() == f"{NAME} · Vapora"

    viewer = pages.open(url)
    expect_live(viewer)
    assert_literal(viewer, "message", MARKUP)
    assert_literal(viewer, "name", NAME)
    assert viewer.title() == f"(Pending) {NAME} · Vapora"

    api(
        server.url,
        f"/api/workflows/{workflow['workflow_id']}/message",
        {"message": MARKUP_LIVE},
    )
    expect(field(viewer, "message")).to_have_text(MARKUP_LIVE, timeout=LIVE_TIMEOUT_MS)
    assert_literal(viewer, "message", MARKUP_LIVE)
    newest = field(viewer, "history").locator("tr").first
    expect(newest).to_have_attribute("data-seq", "2")
    summary = newest.locator("td").nth(2)
    assert summary.text_content() == f"Message: {MARKUP_LIVE}"
    assert summary.locator("*").count() == 0
    injected = viewer.locator("main").locator("img, b, i, svg, script")
    assert injected.count() == 0
    assert viewer.evaluate("typeof window.__pwned") == "undefined"
    pages.assert_clean()


@pytest.mark.browser
def test_list_page_shows_new_workflows_live(
    server_process: StartServer, pages: Pages
) -> None:
    server = server_process()
    listing = pages.open(f"{server.url}/")
    expect_live(listing)
    expect(field(listing, "empty")).to_be_visible()
    loaded = StaysLoaded(listing)
    items = field(listing, "list").locator("li")
    expect(items).to_have_count(0)

    backup = create_workflow(server.url, "Nightly backup", ["dump", "upload"], "queued")
    item = items.and_(listing.locator(f'[data-workflow-id="{backup["workflow_id"]}"]'))
    expect(item).to_be_visible(timeout=LIVE_TIMEOUT_MS)
    expect(field(listing, "empty")).to_be_hidden()
    link = field(item, "name")
    expect(link).to_have_text("Nightly backup")
    expect(link).to_have_attribute("href", f"/workflows/{backup['workflow_id']}")
    expect(field(item, "status_label")).to_have_text("Pending")
    expect(field(item, "step_label")).to_have_text("Not started · 2 steps")
    expect(field(item, "message")).to_have_text("queued")
    expect(field(item, "progress")).to_have_attribute("aria-valuenow", "0")

    # Newest activity first: a second workflow goes on top, and a change to
    # the first brings it back up.
    report = create_workflow(server.url, "Weekly report", ["gather", "send"])
    expect(items).to_have_count(2, timeout=LIVE_TIMEOUT_MS)
    expect(items.first).to_have_attribute("data-workflow-id", report["workflow_id"])

    api(server.url, f"/api/workflows/{backup['workflow_id']}/advance", {})
    expect(field(item, "step_label")).to_have_text(
        "Step 1 of 2", timeout=LIVE_TIMEOUT_MS
    )
    expect(field(item, "status_label")).to_have_text("Running")
    expect(items.first).to_have_attribute("data-workflow-id", backup["workflow_id"])
    expect(items).to_have_count(2)

    loaded.check()
    pages.assert_clean()
