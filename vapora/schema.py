"""The schema on SQLite and on PostgreSQL, their migrations, and SQLite's settings.

The two lists of migrations describe the same tables; a change to the schema
appends one entry to each.
"""

from __future__ import annotations

import logging
import sqlite3
import time

logger = logging.getLogger(__name__)


class NewerSchema(Exception):
    """The database was written by a newer Vapora than this one."""


# Each entry upgrades the schema by one version; PRAGMA user_version records how
# far a file has come. Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE workflows (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        current_step INTEGER NOT NULL,
        steps TEXT NOT NULL,
        message TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        seq INTEGER NOT NULL
    );
    CREATE INDEX workflows_by_activity ON workflows (updated_at DESC);
    CREATE TABLE events (
        workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        at TEXT NOT NULL,
        summary TEXT NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (workflow_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        workflow_id TEXT REFERENCES workflows (id) ON DELETE CASCADE,
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE UNIQUE INDEX tokens_live_name ON tokens (name) WHERE revoked_at IS NULL;
    CREATE INDEX events_by_time ON events (at);
    """,
    """
    ALTER TABLE workflows ADD COLUMN stall_after_s REAL;
    ALTER TABLE workflows ADD COLUMN stalled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE workflows ADD COLUMN stall_at TEXT;
    ALTER TABLE workflows ADD COLUMN gate_deadline TEXT;
    ALTER TABLE workflows ADD COLUMN activity INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX workflows_by_recent_activity ON workflows (activity DESC);
    CREATE INDEX workflows_by_stall ON workflows (stall_at) WHERE stall_at IS NOT NULL;
    CREATE INDEX workflows_by_gate ON workflows (gate_deadline)
        WHERE gate_deadline IS NOT NULL;
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        events TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        id INTEGER PRIMARY KEY,
        webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        workflow_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX deliveries_by_time ON webhook_deliveries (at);
    """,
    # Fewer pages written per change. Events are appended in the order they
    # happen, so retention finds old ones by id, and the index on their time
    # goes. The workflows' index on updated_at, rewritten by every change, gives
    # way to two that only finished workflows enter.
    """
    DROP INDEX workflows_by_activity;
    CREATE INDEX workflows_finished ON workflows (updated_at)
        WHERE status IN ('completed', 'failed', 'cancelled');
    CREATE INDEX workflows_completed_by_name ON workflows (name, updated_at)
        WHERE status = 'completed';
    CREATE TABLE events_by_id (
        id INTEGER PRIMARY KEY,
        workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        at TEXT NOT NULL,
        summary TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    INSERT INTO events_by_id (workflow_id, seq, kind, actor, at, summary, payload)
        SELECT workflow_id, seq, kind, actor, at, summary, payload FROM events
        ORDER BY at, workflow_id, seq;
    DROP TABLE events;
    ALTER TABLE events_by_id RENAME TO events;
    CREATE UNIQUE INDEX events_of_workflow ON events (workflow_id, seq);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Orders the list by the latest change, without ties between equal times.
NEXT_ACTIVITY = "(SELECT coalesce(max(activity), 0) + 1 FROM workflows)"

# PostgreSQL's schema_version table records each migration applied. Its first
# entry is where the SQLite file stands after its third.
PG_MIGRATIONS: list[str] = [
    """
    CREATE TABLE workflows (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        current_step INTEGER NOT NULL,
        steps TEXT NOT NULL,
        message TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        seq INTEGER NOT NULL,
        stall_after_s DOUBLE PRECISION,
        stalled INTEGER NOT NULL DEFAULT 0,
        stall_at TEXT,
        gate_deadline TEXT,
        activity BIGINT NOT NULL DEFAULT 0
    );
    CREATE SEQUENCE workflow_activity;
    CREATE INDEX workflows_by_activity ON workflows (updated_at DESC);
    CREATE INDEX workflows_by_recent_activity ON workflows (activity DESC);
    CREATE INDEX workflows_by_stall ON workflows (stall_at) WHERE stall_at IS NOT NULL;
    CREATE INDEX workflows_by_gate ON workflows (gate_deadline)
        WHERE gate_deadline IS NOT NULL;
    CREATE TABLE events (
        workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        at TEXT NOT NULL,
        summary TEXT NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (workflow_id, seq)
    );
    CREATE INDEX events_by_time ON events (at);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        workflow_id TEXT REFERENCES workflows (id) ON DELETE CASCADE,
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE UNIQUE INDEX tokens_live_name ON tokens (name) WHERE revoked_at IS NULL;
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        events TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        workflow_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX deliveries_by_time ON webhook_deliveries (at);
    """,
    """
    DROP INDEX workflows_by_activity;
    CREATE INDEX workflows_finished ON workflows (updated_at)
        WHERE status IN ('completed', 'failed', 'cancelled');
    CREATE INDEX workflows_completed_by_name ON workflows (name, updated_at)
        WHERE status = 'completed';
    ALTER TABLE events ADD COLUMN id BIGINT GENERATED ALWAYS AS IDENTITY;
    CREATE UNIQUE INDEX events_by_id ON events (id);
    DROP INDEX events_by_time;
    """,
]
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
PG_NEXT_ACTIVITY = "nextval('workflow_activity')"


def configure(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Apply the settings every connection needs."""
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    conn.execute("PRAGMA foreign_keys = ON")
    # WAL with NORMAL survives a killed process; only a power cut can take the
    # last transactions.
    conn.execute("PRAGMA synchronous = NORMAL")


def migrate(conn: sqlite3.Connection, path: str, busy_timeout_ms: int) -> None:
    """Bring the file's schema to SCHEMA_VERSION, one migration a transaction.

    Several processes may start on one file at once: each migration reads the
    version inside its own write transaction, so each runs exactly once.
    """
    use_wal(conn, busy_timeout_ms)
    fresh = None
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise NewerSchema(
                    f"{path} has schema version {version}, newer than this "
                    f"Vapora understands ({SCHEMA_VERSION}); upgrade Vapora"
                )
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            if fresh is None:
                fresh = version == 0
                if fresh:
                    logger.info("Creating %s (schema version %d)", path, SCHEMA_VERSION)
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if not fresh:
            logger.info("Migrated %s to schema version %d", path, version + 1)


def use_wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Switch the file to WAL, waiting while another process holds it."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as error:
            # The busy handler does not cover this pragma.
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
