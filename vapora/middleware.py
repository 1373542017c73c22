"""Middlewares: forwarded headers, errors as JSON or pages, security headers."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable

import aiohttp_jinja2
from aiohttp import web

from .app_keys import SETTINGS
from .auth import CSRF_COOKIE, NEW_CSRF_SEED
from .errors import TooManyRequests, VaporaError

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def forwarded_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Believe X-Forwarded-For and -Proto, but only from a trusted proxy."""
    settings = request.app[SETTINGS]
    if request.remote not in settings.proxies:
        return await handler(request)
    remote, scheme = request.remote, request.scheme
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
    # The client is the nearest address that is not one of our proxies.
    for hop in reversed([h for h in hops if h]):
        if hop not in settings.proxies and _is_address(hop):
            remote = hop
            break
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
    if proto in ("http", "https"):
        scheme = proto
    return await handler(request.clone(remote=remote, scheme=scheme))


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_api(request: web.Request) -> bool:
    """Whether the request is for the API (and sockets), not for a page."""
    path = request.path.removeprefix(request.app[SETTINGS].base_path)
    return path.startswith("/api/")


def wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return is_api(request) or accept.startswith("application/json")


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


@web.middleware
async def csrf_cookie_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Give each browser a random CSRF seed cookie on its first page."""
    new_seed = None
    wants_page = request.method == "GET" and not is_api(request)
    if CSRF_COOKIE not in request.cookies and wants_page:
        new_seed = secrets.token_urlsafe(24)
        request[NEW_CSRF_SEED] = new_seed
    response = await handler(request)
    if new_seed is not None and not response.prepared:
        response.set_cookie(
            CSRF_COOKIE,
            new_seed,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
        )
    return response
