"""SQLite: changes committed on the event loop, reads beside them through aiosqlite.

Each change is one transaction: BEGIN IMMEDIATE, read, check the rules, write,
commit. Taking the write lock before reading is what lets several processes
share one file. In WAL mode with synchronous=NORMAL a commit appends a few pages
to the log and does not wait for the disk, so it runs on the event loop itself,
which is cheaper and steadier than handing it to a thread. Two things could make
it wait, and both go to the writer's thread instead:

- another process holding the write lock: the loop's connection never waits
  for a lock (busy_timeout 0); when the file is busy, the change is run again on
  the writer's thread, which does wait;
- copying the log back into the database (a checkpoint, which syncs the file):
  the loop's connection never checkpoints; the writer's thread does, every
  CHECKPOINT_PAGES pages or so, beside the writes.

The server's own records (sessions, tokens, retention) are written on the
writer's thread too: they are rare, and some are long.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import SimpleQueue
from typing import Any, TypeVar

import aiosqlite

from . import schema
from .database import Plan, Query, Row
from .errors import RuleViolation, Unavailable
from .schema import NEXT_ACTIVITY
from .stats import Histogram

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
PAGE_BYTES = 4096
# Pages written to the log between checkpoints, as estimated from each change's
# size. A checkpoint copies each page once however often the log holds it, so
# fewer, larger checkpoints cost less (SQLite's own default is 1,000 pages).
CHECKPOINT_PAGES = 4000
# Pages (frames) in the log, about 40 MB, past which a checkpoint holds writes
# back, for at most RESTART_WAIT_MS, until the log can start over.
LOG_LIMIT_FRAMES = 10_000
RESTART_WAIT_MS = 200
# Once the log starts over, its file is cut back to this size.
LOG_FILE_LIMIT_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


class WriterThread:
    """One thread that runs, in order, the writes that may have to wait."""

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
    """One SQLite file in WAL mode: a connection for changes on the event loop, a
    writer connection on its own thread, and a reader through aiosqlite."""

    next_activity = NEXT_ACTIVITY
    one_writer = True

    def __init__(self, path: str, write_seconds: Histogram) -> None:
        self.path = path
        self.write_seconds = write_seconds
        self._inline: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._write_thread: WriterThread | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pages_since_checkpoint = 0
        self._stuck_warned_at = -3600.0
        self._checkpoint: asyncio.Task[None] | None = None
        self._log_full = False

    async def open(self) -> None:
        self._write_thread = WriterThread()
        self._writer = await self._in_writer(
            lambda: self._connect(BUSY_TIMEOUT_MS, check_same_thread=False)
        )
        await self._in_writer(self._migrate)
        self._inline = self._connect(0, check_same_thread=True)
        self._inline.execute("PRAGMA wal_autocheckpoint = 0")
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        self._reader.row_factory = aiosqlite.Row
        await self._reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    async def close(self) -> None:
        if self._checkpoint is not None:
            await asyncio.wait([self._checkpoint])
        if self._reader is not None:
            await self._reader.close()
        if self._inline is not None:
            self._inline.close()
        if self._writer is not None:
            await self._in_writer(self._writer.close)
        if self._write_thread is not None:
            self._write_thread.stop()
        self._reader = self._inline = self._writer = self._write_thread = None

    def _migrate(self) -> None:
        schema.migrate(self.writer, self.path, BUSY_TIMEOUT_MS)
        # A migration may have filled the log; let it start over small.
        self.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def _connect(
        self, busy_timeout_ms: int, check_same_thread: bool
    ) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=check_same_thread
        )
        conn.row_factory = sqlite3.Row
        schema.configure(conn, busy_timeout_ms)
        conn.execute(f"PRAGMA journal_size_limit = {LOG_FILE_LIMIT_BYTES}")
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
        with busy_means_unavailable():
            return await self._in_writer(
                lambda: int(self.writer.execute(sql, params).rowcount)
            )

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        # Reading and closing in one call matters: a statement left open while
        # other reads interleave on the same connection would hold its read
        # transaction, and later reads would see a stale snapshot.
        return list(await self.reader.execute_fetchall(sql, params))

    async def change(self, lock: Query | None, plan: Plan[T]) -> T:
        if self._inline is None:
            raise RuntimeError("store is not open")
        if self._log_full:
            return await self._on_writer_thread(lock, plan)
        try:
            result, written = self._transaction(self._inline, lock, plan)
        except sqlite3.OperationalError as error:
            if not is_busy(error):
                raise
            # Another process is writing: wait for it off the loop.
            return await self._on_writer_thread(lock, plan)
        # The table's and the indexes' pages, and a page for each 4 kB of text.
        self._pages_since_checkpoint += 4 + written // PAGE_BYTES
        if (
            self._pages_since_checkpoint >= CHECKPOINT_PAGES
            and self._checkpoint is None
        ):
            self._pages_since_checkpoint = 0
            self._checkpoint = asyncio.create_task(self._run_checkpoint())
        return result

    async def _on_writer_thread(self, lock: Query | None, plan: Plan[T]) -> T:
        with busy_means_unavailable():
            result, _ = await self._in_writer(
                lambda: self._transaction(self.writer, lock, plan)
            )
        return result

    def _transaction(
        self, conn: sqlite3.Connection, lock: Query | None, plan: Plan[T]
    ) -> tuple[T, int]:
        """Run the plan in one IMMEDIATE transaction on conn.

        Return its result and the characters of text it wrote.
        """
        started = time.monotonic()
        written = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = None if lock is None else conn.execute(*lock).fetchone()
            result, writes = plan(row)
            for write in writes:
                cursor = conn.execute(write.sql, write.params)
                if write.refusal and cursor.rowcount != 1:
                    raise RuleViolation("seq", write.refusal)
                written += sum(len(p) for p in write.params if isinstance(p, str))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.write_seconds.observe(time.monotonic() - started)
        return result, written

    async def _run_checkpoint(self) -> None:
        """Copy the log back into the database, on the writer's thread.

        A PASSIVE checkpoint copies beside the writes. The log starts over at
        the first write after a checkpoint has caught up with it, but under
        steady writes there is always a newer frame by then. So once the log is
        LOG_LIMIT_FRAMES long, changes queue on the writer's thread behind a
        RESTART checkpoint, which copies the rest and lets the log start over.
        It waits at most RESTART_WAIT_MS for other connections' reads to end.
        """
        try:
            frames = await self._in_writer(lambda: self._checkpoint_log("PASSIVE"))
            if frames >= LOG_LIMIT_FRAMES:
                self._log_full = True
                try:
                    done = await self._in_writer(self._restart_log)
                finally:
                    self._log_full = False
                if not done:
                    self._warn_stuck(frames)
        except sqlite3.Error as error:
            logger.warning("Checkpoint of %s failed: %s", self.path, error)
        finally:
            self._checkpoint = None

    def _checkpoint_log(self, mode: str) -> int:
        """Run one checkpoint; return the frames the log held."""
        row = self.writer.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(row[1])

    def _restart_log(self) -> bool:
        """A RESTART checkpoint that waits briefly; whether it finished."""
        self.writer.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
        try:
            busy, _, _ = self.writer.execute(
                "PRAGMA wal_checkpoint(RESTART)"
            ).fetchone()
        finally:
            self.writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return not busy

    def _warn_stuck(self, frames: int) -> None:
        """Say, at most once an hour, that the log cannot start over."""
        now = time.monotonic()
        if now - self._stuck_warned_at < 3600:
            return
        self._stuck_warned_at = now
        logger.warning(
            "The write-ahead log of %s holds %d MB and cannot start over: another "
            "connection to the file has kept a read open for a long time",
            self.path,
            frames * PAGE_BYTES // 1_000_000,
        )


def is_busy(error: sqlite3.OperationalError) -> bool:
    return error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


@contextmanager
def busy_means_unavailable() -> Iterator[None]:
    """Turn a lock held past the busy timeout into a 503 that says so."""
    try:
        yield
    except sqlite3.OperationalError as error:
        if not is_busy(error):
            raise
        raise Unavailable(
            "database",
            f"another process has held the database for over "
            f"{BUSY_TIMEOUT_MS // 1000} s; try again",
            retry_after_s=1,
        ) from None
