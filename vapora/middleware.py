"""The middleware every request passes through, and the error answers it gives.

It does, in this order, what separate middlewares would: believe forwarded
headers from a trusted proxy, count the request, add security headers, turn
errors into answers, give a browser its CSRF seed and a page its template
context. A socket's handler stays suspended inside every middleware's frame for
as long as the socket is open, and each frame costs a few hundred bytes per
socket, so they are one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .app_keys import AUTH, SETTINGS, STATS
from .auth import CSRF_COOKIE, NEW_CSRF_SEED
from .errors import RetryLater, VaporaError
from .settings import is_address

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@web.middleware
async def request_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Run each step named above around the handler, outermost first."""
    request = forwarded(request)
    status = 500
    try:
        try:
            new_seed = new_csrf_seed(request)
            if not is_api(request):
                request[aiohttp_jinja2.REQUEST_CONTEXT_KEY] = template_context(request)
            response = await handler(request)
        except VaporaError as error:
            response = vapora_error_response(request, error)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.empty_body:
                raise
            response = http_error_response(request, exc)
        except ConnectionResetError:
            raise  # the client went away mid-request: no one to answer
        except Exception:
            # A bug, not the caller's doing: still an answer in the usual shape
            # (CancelledError is a BaseException, and passes by). Once a stream
            # or socket has begun, aiohttp logs it and drops the connection.
            if request.writer.output_size > 0:
                raise
            logger.exception("Unexpected error in %s %s", request.method, request.path)
            response = error_response(
                request, 500, "internal_error", "something went wrong on our side", None
            )
        else:
            if new_seed is not None:
                set_csrf_cookie(request, response, new_seed)
        if not response.prepared:
            add_security_headers(response)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        count_request(request, status)


def forwarded(request: web.Request) -> web.Request:
    """Believe X-Forwarded-For and -Proto, but only from a trusted proxy."""
    proxies = request.app[SETTINGS].proxies
    if request.remote not in proxies:
        return request
    remote, scheme = request.remote, request.scheme
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
    # The client is the nearest address that is not one of our proxies.
    for hop in reversed([h for h in hops if h]):
        if hop not in proxies and is_address(hop):
            remote = hop
            break
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
    if proto in ("http", "https"):
        scheme = proto
    return request.clone(remote=remote, scheme=scheme)


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


def vapora_error_response(request: web.Request, error: VaporaError) -> web.Response:
    response = error_response(
        request, error.status, error.code, error.message, error.field
    )
    if isinstance(error, RetryLater):
        response.headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return response


def http_error_response(request: web.Request, exc: web.HTTPException) -> web.Response:
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


def add_security_headers(response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("X-Frame-Options", "DENY")


def count_request(request: web.Request, status: int) -> None:
    """Count the request by its route's template (never the raw path) and status."""
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    request.app[STATS].requests[(name, status)] += 1


def new_csrf_seed(request: web.Request) -> str | None:
    """Make a random CSRF seed for a browser's first page, to send as a cookie."""
    if request.method != "GET" or is_api(request) or CSRF_COOKIE in request.cookies:
        return None
    seed = secrets.token_urlsafe(24)
    request[NEW_CSRF_SEED] = seed
    return seed


def set_csrf_cookie(
    request: web.Request, response: web.StreamResponse, seed: str
) -> None:
    if not response.prepared:
        response.set_cookie(
            CSRF_COOKIE,
            seed,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path=request.app[AUTH].cookie_path,
        )


def template_context(request: web.Request) -> dict[str, Any]:
    """What every page's template gets.

    Sockets and API calls render no page and get none: that saves a CSRF token
    per request, and a reference cycle (the context holds the request) that
    would keep a socket's connection alive after it closes, until a full
    garbage collection.
    """
    auth = request.app[AUTH]
    # A client that hears nothing for this long treats its link as dead.
    silence_ms = int(request.app[SETTINGS].heartbeat_s * 2500) + 2000
    return {
        "csrf_token": auth.csrf_token(request),
        "request": request,
        "silence_ms": silence_ms,
    }
