"""The SQLite schema and its migrations, and the connection settings."""

from __future__ import annotations

import logging
import sqlite3

logger = logging.getLogger(__name__)

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
]
SCHEMA_VERSION = len(MIGRATIONS)

# Orders the list by the latest change, without ties between equal times.
NEXT_ACTIVITY = "(SELECT coalesce(max(activity), 0) + 1 FROM workflows)"


def configure(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Apply the settings every connection needs."""
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    conn.execute("PRAGMA foreign_keys = ON")
    # WAL with NORMAL survives a killed process; only a power cut can take the
    # last transactions.
    conn.execute("PRAGMA synchronous = NORMAL")


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file's schema to SCHEMA_VERSION, one migration a transaction."""
    conn.execute("PRAGMA journal_mode = WAL")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"{path} has schema version {version}, newer than this "
            f"Vapora understands ({SCHEMA_VERSION}); upgrade Vapora"
        )
    if version == 0:
        logger.info("Creating %s (schema version %d)", path, SCHEMA_VERSION)
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if version > 0:
            logger.info("Migrated %s to schema version %d", path, number + 1)
