"""SQLite: writes on a thread of their own, reads beside them through aiosqlite.

Each change runs as a single call on the writer's thread that holds the whole
transaction: BEGIN IMMEDIATE, read, check the rules, write, commit. Taking the
write lock before reading is what lets several processes share one file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

import aiosqlite

from . import schema
from .database import Plan, Query, Row
from .errors import RuleViolation
from .schema import NEXT_ACTIVITY
from .stats import Histogram

BUSY_TIMEOUT_MS = 5000

T = TypeVar("T")


class WriterThread:
    """One thread that runs the store's writes, in order, for the event loop."""

    def __init__(self) -> None:
        self._jobs: SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None]
        self._jobs = SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="vapora-writer", daemon=True
        )
        self._thread.start()

    async def run(self, work: Callable[[], T]) -> T:
        """Run work on the thread; return its result or raise its exception."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((work, future))
        return await future

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, future = job
            try:
                result, error = work(), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            future.get_loop().call_soon_threadsafe(_settle, future, result, error)


def _settle(
    future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SqliteDatabase:
    """One SQLite file in WAL mode: a writer connection on its thread, a reader."""

    next_activity = NEXT_ACTIVITY
    one_writer = True

    def __init__(self, path: str, write_seconds: Histogram) -> None:
        self.path = path
        self.write_seconds = write_seconds
        self._writer: sqlite3.Connection | None = None
        self._write_thread: WriterThread | None = None
        self._reader: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self._write_thread = WriterThread()
        self._writer = await self._in_writer(self._connect_writer)
        await self._in_writer(
            lambda: schema.migrate(self.writer, self.path, BUSY_TIMEOUT_MS)
        )
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        self._reader.row_factory = aiosqlite.Row
        await self._reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
        if self._writer is not None:
            await self._in_writer(self._writer.close)
        if self._write_thread is not None:
            self._write_thread.stop()
        self._reader = self._writer = self._write_thread = None

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        schema.configure(conn, BUSY_TIMEOUT_MS)
        return conn

    async def _in_writer(self, work: Callable[[], T]) -> T:
        """Run work on the writer's thread and wait for it."""
        if self._write_thread is None:
            raise RuntimeError("store is not open")
        return await self._write_thread.run(work)

    @property
    def writer(self) -> sqlite3.Connection:
        """The writer's connection: use it only on the writer's thread."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return await self._in_writer(
            lambda: int(self.writer.execute(sql, params).rowcount)
        )

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        # Reading and closing in one call matters: a statement left open while
        # other reads interleave on the same connection would hold its read
        # transaction, and later reads would see a stale snapshot.
        return list(await self.reader.execute_fetchall(sql, params))

    async def change(self, lock: Query | None, plan: Plan[T]) -> T:
        return await self._in_writer(lambda: self._transaction(lock, plan))

    def _transaction(self, lock: Query | None, plan: Plan[T]) -> T:
        """On the writer's thread: run the plan in one IMMEDIATE transaction."""
        started = time.monotonic()
        conn = self.writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = None if lock is None else conn.execute(*lock).fetchone()
            result, writes = plan(row)
            for write in writes:
                cursor = conn.execute(write.sql, write.params)
                if write.refusal and cursor.rowcount != 1:
                    raise RuleViolation("seq", write.refusal)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.write_seconds.observe(time.monotonic() - started)
        return result
