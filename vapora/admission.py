"""Who may open a socket or event stream: origin, reader rights, per-address limits."""

from __future__ import annotations

import logging
from collections import Counter

from aiohttp import web

from .app_keys import AUTH, SETTINGS, STORE
from .errors import Forbidden, InvalidInput, TooManyRequests
from .validate import excerpt, parse_count

logger = logging.getLogger(__name__)

OPEN_CONNECTIONS = web.AppKey("open_connections", Counter[str])
# The largest seq the databases store (a signed 64-bit integer).
MAX_SEQ = 2**63 - 1


def parse_after(request: web.Request) -> int | None:
    """Read the seq to resume from: `after` or Last-Event-ID; 400 if it is bad."""
    raw = request.query.get("after") or request.headers.get("Last-Event-ID")
    if raw is None or raw == "":
        return None
    after = parse_count(raw, MAX_SEQ)
    if after is None:
        raise InvalidInput(
            "after", f"after must be a seq number, 0 to {MAX_SEQ}, got {excerpt(raw)}"
        )
    return after


def check_origin(request: web.Request) -> None:
    """Refuse a browser page from a foreign site (cross-site WebSocket hijacking)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser: scripts and curl send no Origin
    own = f"{request.scheme}://{request.host}"
    if origin == own or origin in request.app[SETTINGS].origins:
        return
    logger.warning("Refused a socket from %s for origin %s", request.remote, origin)
    raise Forbidden("Origin", f"origin {origin} may not open sockets here")


async def admit(request: web.Request, workflow_id: str | None) -> None:
    """Check everything a subscriber must pass before its connection is upgraded."""
    check_origin(request)
    auth = request.app[AUTH]
    if workflow_id is None:
        if not await auth.reads_everything(request):
            await auth.require_read(request, "")
        return
    # Permission first: a 404 for an unknown id and a 401 for a private one
    # would tell anyone which ids exist.
    await auth.require_read(request, workflow_id)
    await request.app[STORE].get_workflow(workflow_id)


# Two calls rather than a context manager, which would be kept alive, with its
# generator, for as long as each socket is open.
def take_slot(request: web.Request) -> None:
    """Take one of the client address's connection slots; 429 when none is left."""
    address = request.remote or "?"
    counts = request.app[OPEN_CONNECTIONS]
    limit = request.app[SETTINGS].max_connections_per_address
    if counts[address] >= limit:
        logger.warning("Refused connection %d from %s", limit + 1, address)
        raise TooManyRequests(
            None, f"at most {limit} open connections per address", retry_after_s=5
        )
    counts[address] += 1


def free_slot(request: web.Request) -> None:
    """Give back the slot that take_slot took, once the connection has ended."""
    address = request.remote or "?"
    counts = request.app[OPEN_CONNECTIONS]
    counts[address] -= 1
    if counts[address] <= 0:
        del counts[address]
