"""API tokens, share links and admin sessions, kept hashed in the store.

A token has a scope: `read` (every workflow, or one: a share link), `publish`
(one workflow), `publish_any`, or `admin`. Its secret is shown once, when it is
made; the store keeps only its SHA-256.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from enum import StrEnum

import aiosqlite

from .errors import InvalidInput, NotFound
from .model import utc_now
from .store import Store, hash_secret
from .validate import clean_text, excerpt

TOKEN_PREFIX = "vpr_"
UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE for a duplicate key
MAX_TOKEN_NAME_CHARS = 80
SHARE_NAME_TRIES = 10


class Scope(StrEnum):
    READ = "read"
    PUBLISH = "publish"
    PUBLISH_ANY = "publish_any"
    ADMIN = "admin"

    @property
    def label(self) -> str:
        return SCOPE_LABELS[self]


SCOPE_LABELS = {
    Scope.READ: "Read",
    Scope.PUBLISH: "Publish to one workflow",
    Scope.PUBLISH_ANY: "Publish to any workflow",
    Scope.ADMIN: "Admin",
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking, and what they may do."""

    actor: str
    scope: Scope
    workflow_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope is Scope.ADMIN

    def can_read(self, workflow_id: str) -> bool:
        return self.workflow_id is None or self.workflow_id == workflow_id

    def can_publish(self, workflow_id: str | None) -> bool:
        """Whether this principal may change workflow_id (None: create one)."""
        if self.scope in (Scope.ADMIN, Scope.PUBLISH_ANY):
            return True
        return (
            self.scope is Scope.PUBLISH
            and workflow_id is not None
            and workflow_id == self.workflow_id
        )


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    name: str
    scope: Scope
    workflow_id: str | None
    created_at: str
    revoked_at: str | None

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.scope, self.workflow_id)


def clean_scope(value: object) -> Scope:
    try:
        return Scope(str(value))
    except ValueError:
        allowed = ", ".join(s.value for s in Scope)
        raise InvalidInput("scope", f"scope must be one of: {allowed}") from None


def is_unique_violation(error: Exception) -> bool:
    """Whether SQLite or PostgreSQL refused a write for a duplicate key."""
    # asyncpg's UniqueViolationError carries the standard SQLSTATE; matching on
    # it spares loading asyncpg where PostgreSQL is not used.
    if isinstance(error, sqlite3.IntegrityError):
        return error.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_UNIQUE
    return getattr(error, "sqlstate", None) == UNIQUE_VIOLATION


class Credentials:
    """Makes, finds and revokes tokens; keeps admin sessions."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create_token(
        self, name: object, scope: Scope, workflow_id: str | None = None
    ) -> tuple[Token, str]:
        """Make a token and return it with its secret, which is never stored."""
        name = clean_text(name, "name", MAX_TOKEN_NAME_CHARS, required=True)
        if scope is Scope.PUBLISH and not workflow_id:
            raise InvalidInput("workflow_id", "a publish token needs its workflow")
        if scope in (Scope.PUBLISH_ANY, Scope.ADMIN):
            workflow_id = None
        if workflow_id:
            await self.store.get_workflow(workflow_id)
        taken = InvalidInput("name", f"a token named {name!r} already exists")
        if await self.store.fetch_one(
            "SELECT 1 FROM tokens WHERE name = ? AND revoked_at IS NULL", (name,)
        ):
            raise taken

        secret = TOKEN_PREFIX + secrets.token_urlsafe(24)
        token = Token(
            secrets.token_urlsafe(6), name, scope, workflow_id, utc_now(), None
        )
        try:
            await self.store.execute(
                "INSERT INTO tokens (id, name, scope, workflow_id, token_hash, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token.id,
                    name,
                    scope.value,
                    workflow_id,
                    hash_secret(secret),
                    token.created_at,
                ),
            )
        except Exception as error:
            # The check above cannot see a token made at the same moment; the
            # unique index on live names can.
            if is_unique_violation(error):
                raise taken from None
            raise
        return token, secret

    async def create_share_link(self, workflow_id: str) -> tuple[Token, str]:
        """Make a read token for one workflow, numbered past every one made before.

        Revoked links count too, so a number is never given twice; a name taken
        all the same (by hand, or by a link made at the same moment) is skipped.
        """
        await self.store.get_workflow(workflow_id)
        row = await self.store.fetch_one(
            "SELECT count(*) FROM tokens WHERE workflow_id = ? AND scope = ?",
            (workflow_id, Scope.READ.value),
        )
        made = int(row[0])
        number = made
        while True:
            number += 1
            name = f"share link {number} of {workflow_id}"
            try:
                return await self.create_token(name, Scope.READ, workflow_id)
            except InvalidInput as error:
                if error.field != "name" or number - made >= SHARE_NAME_TRIES:
                    raise

    async def find(self, secret: str) -> Token | None:
        """Return the live token with this secret, if any."""
        if not secret.startswith(TOKEN_PREFIX):
            return None
        row = await self.store.fetch_one(
            "SELECT * FROM tokens WHERE token_hash = ? AND revoked_at IS NULL",
            (hash_secret(secret),),
        )
        return None if row is None else _token_from_row(row)

    async def list_tokens(self, workflow_id: str | None = None) -> list[Token]:
        if workflow_id is None:
            rows = await self.store.fetch_all(
                "SELECT * FROM tokens WHERE revoked_at IS NULL ORDER BY created_at DESC"
            )
        else:
            rows = await self.store.fetch_all(
                "SELECT * FROM tokens WHERE revoked_at IS NULL AND workflow_id = ? "
                "ORDER BY created_at DESC",
                (workflow_id,),
            )
        return [_token_from_row(row) for row in rows]

    async def revoke(self, token_id: str) -> None:
        """Revoke a token at once; NotFound if there is no live token with that id."""
        changed = await self.store.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (utc_now(), token_id),
        )
        if not changed:
            raise NotFound("token_id", f"no live token with id {excerpt(token_id, 40)}")

    # -- admin sessions --------------------------------------------------------

    async def add_session(self, token: str, expires_at: str) -> None:
        await self.store.execute(
            "INSERT INTO sessions (token_hash, created_at, expires_at) "
            "VALUES (?, ?, ?)",
            (hash_secret(token), utc_now(), expires_at),
        )

    async def session_valid(self, token: str) -> bool:
        row = await self.store.fetch_one(
            "SELECT 1 FROM sessions WHERE token_hash = ? AND expires_at > ?",
            (hash_secret(token), utc_now()),
        )
        return row is not None

    async def drop_session(self, token: str) -> None:
        """End one session, and forget every expired one."""
        await self.store.execute(
            "DELETE FROM sessions WHERE token_hash = ? OR expires_at <= ?",
            (hash_secret(token), utc_now()),
        )


def _token_from_row(row: aiosqlite.Row) -> Token:
    return Token(
        row["id"],
        row["name"],
        Scope(row["scope"]),
        row["workflow_id"],
        row["created_at"],
        row["revoked_at"],
    )
