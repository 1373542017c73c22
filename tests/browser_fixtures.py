"""Headless Chromium for the browser tests, and small helpers they share.

Chromium is Debian's /usr/bin/chromium, driven through the sync Playwright API.
When it is missing the browser tests are skipped, or fail when CI is set.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    expect,
    sync_playwright,
)

from .conftest import ADMIN_TOKEN, AUTH

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Default time a browser action may take; expectations pass their own timeouts.
ACTION_TIMEOUT_MS = 10_000
# A change on a connected page shows well within this on 127.0.0.1.
LIVE_TIMEOUT_MS = 5_000

# Installed before any page script runs: note Content-Security-Policy
# violations (an injected inline handler would cause one), the close codes of
# WebSockets, and every frame the page receives, by WebSocket or event stream.
PAGE_PROBES = """
(() => {
  window.__cspViolations = [];
  document.addEventListener("securitypolicyviolation", (event) => {
    window.__cspViolations.push(event.violatedDirective + " " + event.blockedURI);
  });
  window.__socketCloses = [];
  window.__received = [];
  const note = (via, url, data) => {
    let frame = {};
    try {
      frame = JSON.parse(data);
    } catch (err) {}
    window.__received.push({ via, url, type: frame.type, seq: frame.seq ?? null });
  };
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (event) => {
        note("websocket", this.url, event.data);
      });
      this.addEventListener("close", (event) => {
        window.__socketCloses.push(event.code);
      });
    }
  };
  const NativeEventSource = window.EventSource;
  window.EventSource = class extends NativeEventSource {
    constructor(...args) {
      super(...args);
      for (const name of ["snapshot", "update", "ready", "heartbeat"]) {
        this.addEventListener(name, (event) => note("sse", this.url, event.data));
      }
    }
  };
})();
"""

# Direct connections only: the servers under test listen on 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_chromium() -> None:
    """Skip without Chromium; with CI set, fail instead."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return
    reason = f"browser tests need Chromium at {CHROMIUM}, which is missing"
    if "CI" in os.environ:
        pytest.fail(reason + " (CI is set, so this is an error)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="browser", scope="module")
def browser_fixture() -> Iterator[Browser]:
    """One headless Chromium for the tests of a module."""
    require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


class Pages:
    """Opens pages in fresh browser contexts and collects their script errors."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list[BrowserContext] = []
        self.scripted: list[BrowserContext] = []
        self.errors: list[str] = []

    def context(self, javascript: bool = True) -> BrowserContext:
        context = self.browser.new_context(java_script_enabled=javascript)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        context.add_init_script(PAGE_PROBES)
        self.contexts.append(context)
        if javascript:
            self.scripted.append(context)
        return context

    def open(
        self, url: str, context: BrowserContext | None = None, javascript: bool = True
    ) -> Page:
        """Open url in a page of context (or of a new one) and watch its errors."""
        assert urlsplit(url).hostname == "127.0.0.1", url
        page = (context or self.context(javascript)).new_page()
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        page.goto(url)
        return page

    def assert_clean(self) -> None:
        """No uncaught script error and no CSP violation on any open page."""
        assert self.errors == []
        for context in self.scripted:
            for page in context.pages:
                assert page.evaluate("window.__cspViolations") == [], page.url

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture(name="pages")
def pages_fixture(browser: Browser) -> Iterator[Pages]:
    """Pages in their own browser contexts, closed after the test."""
    opened = Pages(browser)
    try:
        yield opened
    finally:
        opened.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def api(base_url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call the JSON API as the admin: POST body when given, else GET."""
    url = base_url + path
    assert urlsplit(url).hostname == "127.0.0.1", url
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method="GET" if body is None else "POST",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    with _opener.open(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def field(root: Page | Locator, name: str) -> Locator:
    """The element a page marks with data-field=name."""
    return root.locator(f"[data-field={name}]")


def expect_live(page: Page, timeout: float = LIVE_TIMEOUT_MS) -> None:
    """Wait until the page says it follows the server live."""
    expect(field(page, "freshness")).to_have_attribute(
        "data-state", "live", timeout=timeout
    )


def sign_in(pages: Pages, base_url: str) -> Page:
    """Sign in as the admin in a new context; return the admin page."""
    admin = pages.open(f"{base_url}/admin/login")
    admin.fill("#token", ADMIN_TOKEN)
    admin.get_by_role("button", name="Sign in").click()
    expect(admin).to_have_url(f"{base_url}/admin")
    return admin
