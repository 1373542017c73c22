"""The store: workflows, their event log, and the server's own records.

Every change runs in one transaction that raises the workflow's seq by one and
appends the matching event; only after the commit are listeners told, in seq
order for each workflow, so the hub never sees a change that could still roll
back. The rules and the SQL are the same on SQLite and PostgreSQL; database.py
says what each database does for a change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .database import Query, Row, Write, open_database
from .errors import NotFound, RuleViolation
from .model import (
    MAX_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    Event,
    Status,
    Step,
    Workflow,
    summarize,
    to_json,
    utc_now,
)
from .sqlitedb import BUSY_TIMEOUT_MS as BUSY_TIMEOUT_MS
from .stats import Stats
from .validate import (
    clean_decision,
    clean_stall_after,
    clean_steps,
    clean_text,
    excerpt,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Change:
    """A committed change: the workflow's new seq and the update as JSON text."""

    workflow_id: str
    seq: int
    payload: str
    status: Status
    committed_at: float  # time.monotonic() just after the commit
    kind: str = "update"
    previous_status: Status | None = None


Listener = Callable[[Change], None]


def new_workflow_id() -> str:
    """Return a short, URL-safe, random id (72 bits) that never starts with -.

    A leading dash would read as an option on a command line.
    """
    while (workflow_id := secrets.token_urlsafe(9)).startswith("-"):
        pass
    return workflow_id


def hash_secret(secret: str) -> str:
    # Headers and cookies carry bytes that are not UTF-8 as surrogates, and
    # JSON may carry lone ones: each is hashed as it is, and matches nothing.
    return hashlib.sha256(secret.encode(errors="surrogatepass")).hexdigest()


class WriteOrder:
    """Holds writes back so that listeners hear each workflow's changes in order.

    With one writer, every write waits its turn behind one lock, as they run
    one after the other anyway. With several connections, only writes to the
    same workflow wait for each other.
    """

    def __init__(self, one_writer: bool) -> None:
        self._one = asyncio.Lock() if one_writer else None
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def hold(self, workflow_id: str | None) -> AbstractAsyncContextManager[None]:
        """Wait for the turn of workflow_id (None: any write, only with one writer)."""
        if self._one is not None:
            return self._one
        return self._workflow_turn(workflow_id)

    @asynccontextmanager
    async def _workflow_turn(self, workflow_id: str | None) -> AsyncIterator[None]:
        if workflow_id is None:
            yield
            return
        lock, users = self._locks.get(workflow_id, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[workflow_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[workflow_id]
            if users == 1:
                del self._locks[workflow_id]
            else:
                self._locks[workflow_id] = (lock, users - 1)


class Store:
    """Workflows in one SQLite file, or in PostgreSQL when db is its URL.

    Each change is one call to the database that holds the whole transaction:
    lock the workflow's row, check the rules, write, commit.
    """

    def __init__(self, db: str | Path, stats: Stats | None = None) -> None:
        self.stats = stats or Stats()
        self.database = open_database(db, self.stats.store_write_seconds)
        self.epoch = ""
        self._order = WriteOrder(self.database.one_writer)
        self._listeners: list[Listener] = []

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Connect, creating or migrating the schema."""
        await self.database.open()
        self.epoch = await self.ensure_meta("epoch", lambda: secrets.token_hex(8))

    async def close(self) -> None:
        await self.database.close()

    def add_listener(self, listener: Listener) -> None:
        """Call listener with every change, after it commits, in seq order."""
        self._listeners.append(listener)

    # -- small reads and writes for the server's own records -----------------

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one write statement in its own transaction; return the rows changed."""
        async with self._order.hold(None):
            return await self.database.execute(sql, params)

    async def fetch_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Run one query to its end and return its rows."""
        return await self.database.fetch_all(sql, params)

    async def fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    # -- meta -----------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self.fetch_one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def ensure_meta(self, key: str, make: Callable[[], str]) -> str:
        """Return the key's value, setting it first if it has none.

        Of several processes starting on one database at once, the first to
        insert wins and all of them read its value.
        """
        value = await self.get_meta(key)
        if value is None:
            await self.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO NOTHING",
                (key, make()),
            )
            value = await self.get_meta(key)
        assert value is not None
        return value

    # -- reads ---------------------------------------------------------------

    async def get_workflow(self, workflow_id: str, history: int = 0) -> Workflow:
        """Return one workflow, with its newest `history` events; NotFound if none."""
        row = None
        # Ids are ASCII; JSON can carry text SQLite refuses, a lone surrogate.
        if workflow_id.isascii():
            row = await self.fetch_one(
                "SELECT * FROM workflows WHERE id = ?", (workflow_id,)
            )
        if row is None:
            raise NotFound(
                "workflow_id", f"no workflow with id {excerpt(workflow_id, 40)}"
            )
        workflow = _workflow_from_row(row)
        if history:
            workflow.history = await self.history(workflow_id, history)
        return workflow

    async def list_workflows(
        self, limit: int = 100, only: set[str] | None = None
    ) -> list[Workflow]:
        """Return workflows, newest activity first; only those ids, if given."""
        if only is None:
            rows = await self.fetch_all(
                "SELECT * FROM workflows ORDER BY activity DESC LIMIT ?", (limit,)
            )
        elif not only:
            rows = []
        else:
            ids = sorted(only)[:500]
            marks = ",".join("?" * len(ids))
            rows = await self.fetch_all(
                f"SELECT * FROM workflows WHERE id IN ({marks}) "
                "ORDER BY activity DESC LIMIT ?",
                (*ids, limit),
            )
        return [_workflow_from_row(row) for row in rows]

    async def seqs(self, ids: list[str]) -> dict[str, int]:
        """Return the current seq of each of these workflows that exists."""
        found: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await self.fetch_all(
                f"SELECT id, seq FROM workflows WHERE id IN ({marks})", tuple(chunk)
            )
            found.update((row[0], int(row[1])) for row in rows)
        return found

    async def step_medians(self, name: str, runs: int = 20) -> dict[str, float]:
        """Return how long each step usually takes, from the last completed runs."""
        rows = await self.fetch_all(
            "SELECT steps FROM workflows WHERE name = ? AND status = 'completed' "
            "ORDER BY updated_at DESC LIMIT ?",
            (name, runs),
        )
        durations: dict[str, list[float]] = {}
        for (steps_json,) in rows:
            for step in json.loads(steps_json):
                if (
                    step["state"] == "done"
                    and step["started_at"]
                    and step["finished_at"]
                ):
                    took = datetime.fromisoformat(
                        step["finished_at"]
                    ) - datetime.fromisoformat(step["started_at"])
                    durations.setdefault(step["name"], []).append(took.total_seconds())
        return {name: statistics.median(d) for name, d in durations.items()}

    async def history(self, workflow_id: str, limit: int) -> list[Event]:
        """Return the newest events of a workflow, newest first."""
        rows = await self.fetch_all(
            "SELECT workflow_id, seq, kind, actor, at, summary FROM events "
            "WHERE workflow_id = ? ORDER BY seq DESC LIMIT ?",
            (workflow_id, limit),
        )
        return [Event(*row) for row in rows]

    async def events_after(
        self, workflow_id: str, after_seq: int, limit: int
    ) -> list[tuple[int, str]]:
        """Return (seq, payload) of the events after after_seq, oldest first."""
        rows = await self.fetch_all(
            "SELECT seq, payload FROM events WHERE workflow_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (workflow_id, after_seq, limit),
        )
        return [(int(row[0]), str(row[1])) for row in rows]

    # -- writes --------------------------------------------------------------

    async def create_workflow(
        self,
        name: Any,
        steps: Any,
        actor: str,
        message: Any = "",
        stall_after_s: Any = None,
    ) -> Workflow:
        """Create a workflow at step 0 of N; InvalidInput names a bad field."""
        name = clean_text(name, "name", MAX_NAME_CHARS, required=True)
        clean = clean_steps(steps)
        message = clean_text(message, "message", MAX_MESSAGE_CHARS, required=False)
        stall_after = clean_stall_after(stall_after_s)
        now = utc_now()
        workflow = Workflow(
            id=new_workflow_id(),
            name=name,
            status=Status.PENDING,
            current_step=0,
            steps=clean,
            message=message,
            created_at=now,
            updated_at=now,
            seq=1,
            stall_after_s=stall_after,
        )
        return await self._commit(
            workflow.id,
            None,
            lambda row: self._writes(workflow, "created", actor, True, None, new=True),
        )

    async def advance(
        self, workflow_id: str, actor: str, message: Any = None
    ) -> Workflow:
        """Finish the current step and start the next; past the last, complete."""
        return await self._change(
            workflow_id, actor, message, lambda wf, now: wf.advance(now)
        )

    async def set_status(
        self, workflow_id: str, status: Status, actor: str, message: Any = None
    ) -> Workflow:
        """Set the status; a finished workflow must be reopened first."""
        return await self._change(
            workflow_id, actor, message, lambda wf, now: wf.set_status(status, now)
        )

    async def set_message(self, workflow_id: str, message: Any, actor: str) -> Workflow:
        """Replace the workflow's message."""
        if message is None:
            message = ""
        return await self._change(
            workflow_id, actor, message, lambda wf, now: "message"
        )

    async def reopen(
        self,
        workflow_id: str,
        actor: str,
        message: Any = None,
        status: Status = Status.RUNNING,
    ) -> Workflow:
        """Bring a completed, failed or cancelled workflow back, running by default."""

        return await self._change(
            workflow_id, actor, message, lambda wf, now: wf.reopen(now, status)
        )

    async def answer_gate(
        self, workflow_id: str, decision: Any, actor: str, comment: Any
    ) -> Workflow:
        """Approve or reject the step that waits for a person; 409 if none waits."""
        decision = clean_decision(decision)
        comment = clean_text(comment, "comment", MAX_MESSAGE_CHARS, required=True)
        return await self._change(
            workflow_id,
            actor,
            None,
            lambda wf, now: wf.answer_gate(decision, actor, comment, now),
        )

    async def mark_stalled(self, workflow_id: str) -> Workflow | None:
        """Flag a running workflow whose news is overdue; None if it is not."""

        def rule(wf: Workflow, now: str) -> str:
            if wf.stall_at is None or wf.stall_at > now:
                raise RuleViolation("stalled", "the workflow is not overdue")
            wf.stalled = True
            return "stalled"

        try:
            return await self._change(
                workflow_id, "vapora", None, rule, keep_stall=True
            )
        except (RuleViolation, NotFound):
            return None

    async def expire_gate(self, workflow_id: str) -> Workflow | None:
        """Let a gate's timeout decide it; None if it was answered in time."""

        def rule(wf: Workflow, now: str) -> str:
            gate = wf.open_gate
            deadline = wf.gate_deadline
            if gate is None or deadline is None or deadline > now:
                raise RuleViolation("gate", "the gate is not overdue")
            comment = f"no answer within {gate.timeout_s:g} s"
            return wf.answer_gate(gate.on_timeout, "timeout", comment, now)

        try:
            return await self._change(workflow_id, "timeout", None, rule)
        except (RuleViolation, NotFound):
            return None

    async def due(self, now: str) -> tuple[list[str], list[str]]:
        """Return the ids of workflows whose gate timed out, and of overdue ones."""
        gates = await self.fetch_all(
            "SELECT id FROM workflows WHERE gate_deadline <= ?", (now,)
        )
        stalls = await self.fetch_all(
            "SELECT id FROM workflows WHERE stall_at <= ?", (now,)
        )
        return [r[0] for r in gates], [r[0] for r in stalls]

    async def reset(
        self, workflow_id: str, actor: str, message: Any = None
    ) -> Workflow:
        """Send the workflow back to step 0, on a person's explicit request."""
        return await self._change(
            workflow_id, actor, message, lambda wf, now: wf.reset()
        )

    async def _change(
        self,
        workflow_id: str,
        actor: str,
        message: Any,
        rule: Callable[[Workflow, str], str],
        keep_stall: bool = False,
    ) -> Workflow:
        if message is not None:
            message = clean_text(message, "message", MAX_MESSAGE_CHARS, required=False)

        def plan(row: Row | None) -> tuple[tuple[Workflow, Change], list[Write]]:
            if row is None:
                raise NotFound(
                    "workflow_id", f"no workflow with id {excerpt(workflow_id, 40)}"
                )
            workflow = _workflow_from_row(row)
            previous = workflow.status
            now = utc_now()
            if not keep_stall:
                workflow.stalled = False  # any news ends a stall
            kind = rule(workflow, now)
            message_changed = message is not None and message != workflow.message
            if message is not None:
                workflow.message = message
            workflow.updated_at = now
            workflow.seq += 1
            return self._writes(workflow, kind, actor, message_changed, previous)

        lock = ("SELECT * FROM workflows WHERE id = ?", (workflow_id,))
        return await self._commit(workflow_id, lock, plan)

    async def _commit(
        self,
        workflow_id: str,
        lock: Query | None,
        plan: Callable[[Row | None], tuple[tuple[Workflow, Change], list[Write]]],
    ) -> Workflow:
        """Run one change's plan in a transaction, then tell the listeners."""
        async with self._order.hold(workflow_id):
            workflow, change = await self.database.change(lock, plan)
            self._notify(change)
        return workflow

    def _writes(
        self,
        wf: Workflow,
        kind: str,
        actor: str,
        message_changed: bool,
        previous: Status | None,
        new: bool = False,
    ) -> tuple[tuple[Workflow, Change], list[Write]]:
        """Return the statements that save wf and its event, with the change."""
        summary = summarize(kind, wf, message_changed)
        state = wf.state()
        wf.encoded_state = to_json(state)
        # The event's payload is the state with what happened after it.
        happened = to_json({"kind": kind, "actor": actor, "summary": summary})
        payload_json = wf.encoded_state[:-1] + "," + happened[1:]
        steps_json = to_json(state["steps"])
        row = (
            wf.name,
            wf.status.value,
            wf.current_step,
            steps_json,
            wf.message,
            wf.created_at,
            wf.updated_at,
            wf.seq,
            wf.stall_after_s,
            int(wf.stalled),
            wf.stall_at,
            wf.gate_deadline,
        )
        activity = self.database.next_activity
        if new:
            save = Write(
                "INSERT INTO workflows (name, status, current_step, steps, "
                "message, created_at, updated_at, seq, stall_after_s, stalled, "
                "stall_at, gate_deadline, id, activity) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {activity})",
                (*row, wf.id),
            )
        else:
            save = Write(
                "UPDATE workflows SET name = ?, status = ?, current_step = ?, "
                "steps = ?, message = ?, created_at = ?, updated_at = ?, seq = ?, "
                "stall_after_s = ?, stalled = ?, stall_at = ?, gate_deadline = ?, "
                f"activity = {activity} WHERE id = ? AND seq = ?",
                (*row, wf.id, wf.seq - 1),
                refusal=f"workflow {wf.id} changed under this write; retry it",
            )
        event = Write(
            "INSERT INTO events (workflow_id, seq, kind, actor, at, summary, "
            "payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (wf.id, wf.seq, kind, actor, wf.updated_at, summary, payload_json),
        )
        wf.history = []
        change = Change(
            wf.id, wf.seq, payload_json, wf.status, time.monotonic(), kind, previous
        )
        return (wf, change), [save, event]

    # -- retention -------------------------------------------------------------

    async def prune(self, older_than: str, batch: int = 1000) -> tuple[int, int]:
        """Delete what was last changed before older_than; return (workflows, events).

        Finished workflows go whole. Of the others, old events go, but never a
        workflow's newest one, which holds its current state. Events are kept
        in the order they happened, so the old ones are those before the first
        id at or after older_than. Work is done in small transactions so
        writers are never held up for long.
        """
        finished = ", ".join(f"'{s.value}'" for s in Status if s.is_final)
        workflows = await self._prune_batches(
            "DELETE FROM workflows WHERE id IN (SELECT id FROM workflows "
            f"WHERE status IN ({finished}) AND updated_at < ? LIMIT ?)",
            (older_than, batch),
        )
        # One read, so that events added meanwhile come after the answer.
        first_kept = await self.fetch_one(
            "SELECT coalesce((SELECT id FROM events WHERE at >= ? ORDER BY id "
            "LIMIT 1), (SELECT coalesce(max(id), 0) + 1 FROM events))",
            (older_than,),
        )
        events = await self._prune_batches(
            "DELETE FROM events WHERE id IN (SELECT e.id FROM events e "
            "JOIN workflows w ON w.id = e.workflow_id "
            "WHERE e.id < ? AND e.seq < w.seq LIMIT ?)",
            (first_kept[0], batch),
        )
        await self.execute("DELETE FROM webhook_deliveries WHERE at < ?", (older_than,))
        return workflows, events

    async def _prune_batches(self, sql: str, params: tuple[Any, ...]) -> int:
        total = 0
        while True:
            changed = await self.execute(sql, params)
            total += changed
            if changed < params[-1]:
                return total

    def _notify(self, change: Change) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                logger.exception(
                    "Listener failed on %s seq %d", change.workflow_id, change.seq
                )


def _workflow_from_row(row: Row) -> Workflow:
    return Workflow(
        id=row["id"],
        name=row["name"],
        status=Status(row["status"]),
        current_step=row["current_step"],
        steps=[Step.from_dict(s) for s in json.loads(row["steps"])],
        message=row["message"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        seq=row["seq"],
        stall_after_s=row["stall_after_s"],
        stalled=bool(row["stalled"]),
    )
