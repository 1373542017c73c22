"""What the store asks of a database, and which database a `--db` value names.

The store speaks SQL with `?` placeholders that both databases understand, and
hands each change over as a plan: given the row it locks, the plan checks the
rules and returns the writes, which the database runs in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .stats import Histogram

T = TypeVar("T")

# A row, read by column name or by position: sqlite3.Row or asyncpg.Record.
Row = Any
# One statement with `?` placeholders and its parameters.
Query = tuple[str, tuple[Any, ...]]

POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"


@dataclass(frozen=True, slots=True)
class Write:
    """One statement of a change; when refusal is set, it must change one row."""

    sql: str
    params: tuple[Any, ...]
    refusal: str = ""


Plan = Callable[[Row | None], tuple[T, list[Write]]]


class Database(Protocol):
    """SQLite or PostgreSQL, behind the few calls the store makes."""

    # SQL giving the next value of the list's ordering by latest change.
    next_activity: str
    # Whether every write goes through one connection, one after the other.
    one_writer: bool

    async def open(self) -> None:
        """Connect, and create or migrate the schema."""

    async def close(self) -> None:
        """Let go of every connection."""

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run one write statement in its own transaction; return the rows changed."""

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        """Run one query and return all its rows."""

    async def change(self, lock: Query | None, plan: Plan[T]) -> T:
        """Lock the row `lock` selects, run the plan and its writes, then commit."""


def is_postgresql(db: str | Path) -> bool:
    """Whether a `--db` value names a PostgreSQL database."""
    return str(db).startswith(POSTGRESQL_SCHEMES)


def open_database(db: str | Path, write_seconds: Histogram) -> Database:
    """Return the database a `--db` value names: a PostgreSQL URL, else a file."""
    # Imported here: both import this module, and asyncpg loads only if used.
    if is_postgresql(db):
        from .pgdb import PgDatabase

        return PgDatabase(str(db), write_seconds)
    from .sqlitedb import SqliteDatabase

    path = str(db).removeprefix(SQLITE_SCHEME)
    return SqliteDatabase(path, write_seconds)
