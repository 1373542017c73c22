"""Who is asking and what they may do: tokens, sessions, share links and CSRF."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from datetime import UTC, datetime, timedelta

from aiohttp import web

from .credentials import Credentials, Principal, Scope
from .errors import Forbidden, TooManyRequests, Unauthorized
from .settings import Settings
from .store import Store, hash_secret

logger = logging.getLogger(__name__)

SESSION_COOKIE = "vapora_session"
CSRF_COOKIE = "vapora_csrf"
SHARE_COOKIE_PREFIX = "vapora_share_"
CSRF_FIELD = "csrf_token"
ADMIN = Principal("admin", Scope.ADMIN)
# A CSRF seed made for this request, before its cookie reaches the browser.
NEW_CSRF_SEED = web.RequestKey("new_csrf_seed", str)
PRINCIPAL = web.RequestKey("principal", Principal)
READING_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class FailureThrottle:
    """Slows down an address after repeated failed sign-ins: 2^n seconds, capped."""

    def __init__(self, free_failures: int = 5, max_delay_s: float = 300) -> None:
        self.free_failures = free_failures
        self.max_delay_s = max_delay_s
        # address -> (failures, monotonic time of the last one); oldest first.
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._max_addresses = 10_000

    def check(self, address: str) -> None:
        """Raise TooManyRequests while the address must wait."""
        count, last = self._failures.get(address, (0, 0.0))
        if count < self.free_failures:
            return
        wait = min(self.max_delay_s, 2.0 ** (count - self.free_failures + 1))
        remaining = last + wait - time.monotonic()
        if remaining > 0:
            raise TooManyRequests(
                None,
                f"too many failed sign-ins; try again in {remaining:.0f} s",
                retry_after_s=remaining,
            )

    def failed(self, address: str) -> None:
        count, _ = self._failures.pop(address, (0, 0.0))
        self._failures[address] = (count + 1, time.monotonic())
        if count + 1 == self.free_failures:
            logger.warning("Repeated failed sign-ins from %s; slowing it down", address)
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


class Auth:
    """Finds the principal behind a request and checks what it may do."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.credentials = Credentials(store)
        self.throttle = FailureThrottle()
        self._admin_hash = ""
        self._secret = b""

    async def setup(self) -> None:
        """Load or create the secrets; log a generated admin token once."""
        # Nodes starting together on a new database must agree on the secret.
        secret = await self.store.ensure_meta(
            "csrf_secret", lambda: secrets.token_hex(32)
        )
        self._secret = bytes.fromhex(secret)
        self._admin_hash = await self._load_admin_hash()

    async def _load_admin_hash(self) -> str:
        if self.settings.admin_token:
            return hash_secret(self.settings.admin_token)
        token = secrets.token_urlsafe(24)
        stored = await self.store.ensure_meta(
            "admin_token_hash", lambda: hash_secret(token)
        )
        if stored == hash_secret(token):
            logger.warning(
                "Generated the admin token, shown only this once: %s "
                "(set VAPORA_ADMIN_TOKEN to choose your own)",
                token,
            )
        return stored

    def is_admin_token(self, token: str) -> bool:
        return hmac.compare_digest(hash_secret(token), self._admin_hash)

    @property
    def cookie_path(self) -> str:
        """Where the browser sends our cookies: only to this server's paths."""
        return self.settings.base_path or "/"

    @property
    def public(self) -> bool:
        return self.settings.read_access == "public"

    # -- finding the principal ---------------------------------------------------

    async def principal(self, request: web.Request) -> Principal | None:
        """Return who sent the request: a bearer token or an admin session.

        A browser sends its sign-in cookie with requests that other sites make
        it send, so the cookie counts for reading only. People change things
        through forms that carry a CSRF token; scripts send a bearer token.
        """
        if PRINCIPAL in request:
            return request[PRINCIPAL]
        found = await self._bearer(request)
        reading = request.method in READING_METHODS
        if found is None and reading and await self.is_signed_in(request):
            found = ADMIN
        if found is not None:
            request[PRINCIPAL] = found
        return found

    async def _bearer(self, request: web.Request) -> Principal | None:
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Authorization", "use Authorization: Bearer <token>")
        address = request.remote or "?"
        self.throttle.check(address)
        if self.is_admin_token(token):
            return ADMIN
        found = await self.credentials.find(token)
        if found is None:
            self.throttle.failed(address)
            raise Unauthorized("Authorization", "that token is unknown or revoked")
        return found.principal

    async def require_publish(
        self, request: web.Request, workflow_id: str | None
    ) -> str:
        """Return the actor allowed to change workflow_id; 401 or 403 otherwise."""
        principal = await self.principal(request)
        if principal is None:
            raise Unauthorized(
                "Authorization", "send Authorization: Bearer <token> to make changes"
            )
        if not principal.can_publish(workflow_id):
            what = "create workflows" if workflow_id is None else "change this workflow"
            raise Forbidden("Authorization", f"this token may not {what}")
        return principal.actor

    async def require_gate(self, request: web.Request, workflow_id: str) -> str:
        """Return the actor allowed to answer this workflow's gate; 401, 403, 404."""
        principal = await self.principal(request)
        if principal is None:
            raise Unauthorized("Authorization", "answering a gate needs a token")
        if principal.is_admin:
            return principal.actor
        gate = (await self.store.get_workflow(workflow_id)).open_gate
        if gate is not None and principal.actor in gate.approvers:
            reads = principal.scope is Scope.READ and principal.can_read(workflow_id)
            if principal.can_publish(workflow_id) or reads:
                return principal.actor
        raise Forbidden("Authorization", "this token may not answer this gate")

    async def require_admin(self, request: web.Request) -> str:
        principal = await self.principal(request)
        if principal is None:
            raise Unauthorized("Authorization", "this needs the admin token")
        if not principal.is_admin:
            raise Forbidden("Authorization", "this needs an admin token")
        return principal.actor

    async def can_read(self, request: web.Request, workflow_id: str) -> bool:
        if self.public or workflow_id in await self.shared_with(request):
            return True
        principal = await self.principal(request)
        return principal is not None and principal.can_read(workflow_id)

    async def require_read(self, request: web.Request, workflow_id: str) -> None:
        """Raise Unauthorized unless the request may read workflow_id."""
        if not await self.can_read(request, workflow_id):
            # The same answer as for an unknown id would leak less, but people
            # with a stale link deserve to know that signing in will help.
            raise Unauthorized(
                "workflow_id", "this workflow is private: sign in or use its share link"
            )

    async def reads_everything(self, request: web.Request) -> bool:
        if self.public:
            return True
        principal = await self.principal(request)
        return principal is not None and principal.workflow_id is None

    async def shared_with(self, request: web.Request) -> set[str]:
        """Return the workflow ids this browser holds live share links for."""
        ids = set()
        for name, secret in request.cookies.items():
            if not name.startswith(SHARE_COOKIE_PREFIX):
                continue
            token = await self.credentials.find(secret)
            workflow_id = name.removeprefix(SHARE_COOKIE_PREFIX)
            if token and token.scope is Scope.READ and token.workflow_id == workflow_id:
                ids.add(workflow_id)
        return ids

    def remember_share(
        self,
        request: web.Request,
        response: web.StreamResponse,
        workflow_id: str,
        secret: str,
    ) -> None:
        response.set_cookie(
            SHARE_COOKIE_PREFIX + workflow_id,
            secret,
            max_age=365 * 24 * 3600,
            httponly=True,
            samesite="Lax",
            secure=request.secure,
            path=self.cookie_path,
        )

    # -- browser sessions ----------------------------------------------------------

    def _session_key(self, token: str) -> str:
        """What the store knows a session by: tied to the admin token it began with.

        A session signed in with a token no longer in use is unknown: a new
        admin token signs every browser out.
        """
        return f"{self._admin_hash}:{token}"

    async def is_signed_in(self, request: web.Request) -> bool:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return False
        return await self.credentials.session_valid(self._session_key(token))

    async def sign_in(self, request: web.Request, response: web.StreamResponse) -> None:
        token = secrets.token_urlsafe(32)
        lifetime = timedelta(hours=self.settings.session_hours)
        expires = datetime.now(UTC) + lifetime
        await self.credentials.add_session(
            self._session_key(token), expires.isoformat(timespec="milliseconds")
        )
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(lifetime.total_seconds()),
            httponly=True,
            samesite="Lax",
            secure=request.secure,
            path=self.cookie_path,
        )

    async def sign_out(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            await self.credentials.drop_session(self._session_key(token))
        response.del_cookie(SESSION_COOKIE, path=self.cookie_path)

    # -- CSRF: a token signed over a random per-browser cookie ----------------

    def csrf_token(self, request: web.Request) -> str:
        seed = request.get(NEW_CSRF_SEED) or request.cookies.get(CSRF_COOKIE, "")
        seed_bytes = seed.encode(errors="surrogatepass")
        return hmac.new(self._secret, seed_bytes, hashlib.sha256).hexdigest()

    def check_csrf(self, request: web.Request, submitted: str) -> None:
        """Raise Forbidden unless the form's token matches this browser's cookie."""
        seed = request.cookies.get(CSRF_COOKIE, "")
        if not seed or not hmac.compare_digest(self.csrf_token(request), submitted):
            raise Forbidden(
                CSRF_FIELD, "the form has expired or came from another site; reload it"
            )
