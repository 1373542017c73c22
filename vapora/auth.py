"""Who may change things: the admin token, admin sessions and CSRF tokens."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from aiohttp import web

from .errors import Forbidden, Unauthorized
from .settings import Settings
from .store import Store, hash_secret

logger = logging.getLogger(__name__)

SESSION_COOKIE = "vapora_session"
CSRF_COOKIE = "vapora_csrf"
CSRF_FIELD = "csrf_token"
ADMIN_ACTOR = "admin"
# A CSRF seed made for this request, before its cookie reaches the browser.
NEW_CSRF_SEED = web.RequestKey("new_csrf_seed", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Auth:
    """Checks the admin token, keeps admin sessions, and signs CSRF tokens."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._admin_hash = ""
        self._secret = b""

    async def setup(self) -> None:
        """Load or create the secrets; log a generated admin token once."""
        secret = await self.store.get_meta("csrf_secret")
        if secret is None:
            secret = secrets.token_hex(32)
            await self.store.set_meta("csrf_secret", secret)
        self._secret = bytes.fromhex(secret)

        if self.settings.admin_token:
            self._admin_hash = hash_secret(self.settings.admin_token)
            return
        stored = await self.store.get_meta("admin_token_hash")
        if stored is None:
            token = secrets.token_urlsafe(24)
            stored = hash_secret(token)
            await self.store.set_meta("admin_token_hash", stored)
            logger.warning(
                "Generated the admin token, shown only this once: %s "
                "(set VAPORA_ADMIN_TOKEN to choose your own)",
                token,
            )
        self._admin_hash = stored

    def is_admin_token(self, token: str) -> bool:
        return hmac.compare_digest(hash_secret(token), self._admin_hash)

    # -- API callers ---------------------------------------------------------

    def bearer_actor(self, request: web.Request) -> str:
        """Return the actor named by the Authorization header; 401 when it is wrong."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "Authorization",
                "send Authorization: Bearer <token> to change workflows",
            )
        if not self.is_admin_token(token.strip()):
            raise Unauthorized("Authorization", "that token is not valid")
        return ADMIN_ACTOR

    # -- browser sessions ------------------------------------------------------

    async def is_signed_in(self, request: web.Request) -> bool:
        token = request.cookies.get(SESSION_COOKIE)
        return bool(token) and await self.store.session_valid(token or "")

    async def sign_in(self, request: web.Request, response: web.StreamResponse) -> None:
        token = secrets.token_urlsafe(32)
        lifetime = timedelta(hours=self.settings.session_hours)
        expires = datetime.now(UTC) + lifetime
        await self.store.add_session(token, expires.isoformat(timespec="milliseconds"))
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(lifetime.total_seconds()),
            httponly=True,
            samesite="Lax",
            secure=request.secure,
            path="/",
        )

    async def sign_out(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            await self.store.drop_session(token)
        response.del_cookie(SESSION_COOKIE, path="/")

    # -- CSRF: a token signed over a random per-browser cookie ----------------

    def csrf_token(self, request: web.Request) -> str:
        seed = request.get(NEW_CSRF_SEED) or request.cookies.get(CSRF_COOKIE, "")
        return hmac.new(self._secret, seed.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, request: web.Request, submitted: str) -> None:
        """Raise Forbidden unless the form's token matches this browser's cookie."""
        seed = request.cookies.get(CSRF_COOKIE, "")
        if not seed or not hmac.compare_digest(self.csrf_token(request), submitted):
            raise Forbidden(
                CSRF_FIELD, "the form has expired or came from another site; reload it"
            )


@web.middleware
async def csrf_cookie_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Give each browser a random CSRF seed cookie on its first request."""
    new_seed = None
    if CSRF_COOKIE not in request.cookies:
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
