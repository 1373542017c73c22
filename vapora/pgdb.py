"""PostgreSQL through asyncpg: one database that several Vapora nodes share.

A change locks its workflow's row with SELECT ... FOR UPDATE inside one
transaction, so writers on any number of nodes take their turns, workflow by
workflow, and each seq is handed out once. The store's SQL keeps its `?`
placeholders; they become `$1`, `$2`, ... here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import lru_cache
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from .database import Plan, Query, Row
from .errors import RuleViolation
from .model import utc_now
from .schema import (
    PG_MIGRATIONS,
    PG_NEXT_ACTIVITY,
    PG_SCHEMA_VERSION,
    NewerSchema,
)
from .settings import hide_password
from .stats import Histogram

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONNECTIONS = 10
CLOSE_TIMEOUT_S = 5.0
# Key of the advisory lock that lets one node at a time migrate the schema.
MIGRATION_LOCK = 0x7661706F7261  # "vapora"


@lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """Turn each `?` placeholder outside quotes into `$1`, `$2`, ... in order."""
    out: list[str] = []
    count = 0
    quote = ""
    for char in sql:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "?":
            count += 1
            out.append(f"${count}")
            continue
        out.append(char)
    return "".join(out)


def rows_changed(status: str) -> int:
    """Read the row count from a command tag such as `UPDATE 1` or `INSERT 0 3`."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


class PgDatabase:
    """A pool of connections to one PostgreSQL database."""

    next_activity = PG_NEXT_ACTIVITY
    one_writer = False

    def __init__(self, url: str, write_seconds: Histogram) -> None:
        self.url = url
        self.write_seconds = write_seconds
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=MAX_CONNECTIONS
        )
        async with self.pool.acquire() as conn:
            await migrate(conn, hide_password(self.url))

    async def close(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            pool.terminate()

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return rows_changed(await self.pool.execute(numbered(sql), *params))

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        return list(await self.pool.fetch(numbered(sql), *params))

    async def change(self, lock: Query | None, plan: Plan[T]) -> T:
        async with self.pool.acquire() as conn:
            started = time.monotonic()
            async with conn.transaction():
                row = None
                if lock is not None:
                    sql, params = lock
                    row = await conn.fetchrow(numbered(sql) + " FOR UPDATE", *params)
                result, writes = plan(row)
                for write in writes:
                    status = await conn.execute(numbered(write.sql), *write.params)
                    if write.refusal and rows_changed(status) != 1:
                        raise RuleViolation("seq", write.refusal)
            self.write_seconds.observe(time.monotonic() - started)
        return result


async def migrate(conn: asyncpg.Connection, name: str) -> None:
    """Bring the schema to PG_SCHEMA_VERSION, one node at a time."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        if version > PG_SCHEMA_VERSION:
            raise NewerSchema(
                f"{name} has schema version {version}, newer than this "
                f"Vapora understands ({PG_SCHEMA_VERSION}); upgrade Vapora"
            )
        if version == 0:
            logger.info(
                "Creating the schema in %s (version %d)", name, PG_SCHEMA_VERSION
            )
        for number in range(version, PG_SCHEMA_VERSION):
            await conn.execute(PG_MIGRATIONS[number])
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                number + 1,
                utc_now(),
            )
            if version > 0:
                logger.info("Migrated %s to schema version %d", name, number + 1)
