"""Build the application: store, hub, auth, routes and templates."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from . import admin, api, pages, sse, ws
from .admission import OPEN_CONNECTIONS
from .app_keys import AUTH, HUB, SETTINGS, STORE
from .auth import Auth, csrf_cookie_middleware
from .errors import TooManyRequests, VaporaError
from .hub import Hub
from .model import utc_now
from .settings import Settings
from .store import Store

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PACKAGE_DIR = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path:
    """Find templates/ or static/: inside the installed package, or in a checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"cannot find the {name}/ folder next to {PACKAGE_DIR}")


def wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.headers.get(
        "Accept", ""
    ).startswith("application/json")


def error_response(
    request: web.Request, status: int, code: str, message: str, field: str | None
) -> web.Response:
    if wants_json(request):
        body = {"error": {"code": code, "message": message, "field": field}}
        return web.json_response(body, status=status)
    context = {"status": status, "message": message}
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Answer errors as JSON to API callers and as a page to people."""
    try:
        return await handler(request)
    except VaporaError as error:
        response = error_response(
            request, error.status, error.code, error.message, error.field
        )
        if isinstance(error, TooManyRequests):
            response.headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
        return response
    except web.HTTPException as exc:
        if exc.status < 400 or exc.empty_body:
            raise
        code = exc.reason.lower().replace(" ", "_")
        if exc.status == 413:
            limit = request.app[SETTINGS].max_body_bytes
            return error_response(
                request, 413, code, f"the body is larger than {limit} bytes", None
            )
        message = (
            exc.text
            if exc.text and not exc.text.startswith(str(exc.status))
            else exc.reason
        )
        return error_response(request, exc.status, code, message, None)


CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@web.middleware
async def security_headers_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        headers = response.headers
        headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "same-origin")
        headers.setdefault("X-Frame-Options", "DENY")
    return response


async def template_context(request: web.Request) -> dict[str, Any]:
    auth = request.app[AUTH]
    # A client that hears nothing for this long treats its link as dead.
    silence_ms = int(request.app[SETTINGS].heartbeat_s * 2500) + 2000
    return {
        "csrf_token": auth.csrf_token(request),
        "request": request,
        "silence_ms": silence_ms,
    }


def create_app(settings: Settings) -> web.Application:
    """Return the application for these settings; the store opens on start-up."""
    app = web.Application(
        middlewares=[
            security_headers_middleware,
            error_middleware,
            csrf_cookie_middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    store = Store(settings.db)
    app[SETTINGS] = settings
    app[STORE] = store
    app[AUTH] = Auth(store, settings)
    app[OPEN_CONNECTIONS] = Counter()
    hub = Hub()
    store.add_listener(hub.publish)
    app[HUB] = hub

    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(asset_dir("templates")),
        autoescape=True,
        context_processors=[template_context],
    )
    env.filters.update(pages.TEMPLATE_FILTERS)

    app.cleanup_ctx.append(_store_and_hub)
    app.on_shutdown.append(ws.close_all_sockets)

    app.router.add_get("/api/updates", ws.list_socket, name="list_socket")
    app.router.add_get(
        "/api/workflows/{workflow_id}/updates",
        ws.workflow_socket,
        name="workflow_socket",
    )
    app.router.add_get(
        "/api/workflows/{workflow_id}/events",
        sse.workflow_events,
        name="workflow_events",
    )
    app.router.add_routes(api.routes)
    app.router.add_routes(pages.routes)
    app.router.add_routes(admin.routes)
    app.router.add_static(
        "/static", asset_dir("static"), name="static", append_version=True
    )

    def static(filename: str) -> str:
        return str(app.router["static"].url_for(filename=filename))

    env.globals.update(static=static, loaded_at=utc_now)
    return app


async def _store_and_hub(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.open()
    hub = app[HUB]
    hub.epoch = store.epoch
    await app[AUTH].setup()
    heartbeats = asyncio.create_task(hub.run_heartbeats(app[SETTINGS].heartbeat_s))
    yield
    heartbeats.cancel()
    await store.close()
