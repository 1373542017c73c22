"""The store's rules, on a real SQLite file and on a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vapora import sqlitedb
from vapora.credentials import Credentials, Scope
from vapora.errors import InvalidInput, NotFound, RuleViolation, Unavailable
from vapora.model import Status, StepState
from vapora.schema import MIGRATIONS, PG_SCHEMA_VERSION, SCHEMA_VERSION, NewerSchema
from vapora.store import Change, Store
from vapora.webhooks import Webhooks

from .conftest import make_settings, run_sql


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store keeps its data: an SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(db: str) -> AsyncIterator[Store]:
    store = Store(db)
    await store.open()
    yield store
    await store.close()


async def test_new_workflow_starts_pending_at_step_zero(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["build", "test"], "admin")

    assert wf.status is Status.PENDING
    assert (wf.current_step, wf.total_steps, wf.seq) == (0, 2, 1)
    assert [s.state for s in wf.steps] == [StepState.PENDING, StepState.PENDING]
    assert wf.created_at.endswith("+00:00")


async def test_ids_are_short_url_safe_and_unrelated(store: Store) -> None:
    ids = [(await store.create_workflow("w", ["a"], "admin")).id for _ in range(20)]

    assert len(set(ids)) == 20
    assert all(
        len(i) == 12 and i.replace("-", "").replace("_", "").isalnum() for i in ids
    )
    assert len({i[:6] for i in ids}) == 20


@pytest.mark.parametrize(
    ("name", "steps", "field"),
    [
        ("", ["a"], "name"),
        ("   ", ["a"], "name"),
        ("x" * 201, ["a"], "name"),
        ("ok", [], "steps"),
        ("ok", ["a", ""], "steps"),
        ("ok", "not\x00ok", "steps"),
        ("bell\x07", ["a"], "name"),
        ("half \ud800 surrogate", ["a"], "name"),
        (42, ["a"], "name"),
    ],
)
async def test_bad_workflow_is_refused_and_nothing_saved(
    store: Store, name: object, steps: object, field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.create_workflow(name, steps, "admin")

    assert caught.value.field == field
    assert await store.list_workflows() == []


async def test_unicode_text_is_kept_exactly(store: Store) -> None:
    name = "Déploiement 🚀 نشر 部署"

    wf = await store.create_workflow(name, ["étape ✓"], "admin", "مرحبا 👋")

    again = await store.get_workflow(wf.id)
    assert (again.name, again.steps[0].name, again.message) == (
        name,
        "étape ✓",
        "مرحبا 👋",
    )


async def test_advance_walks_the_steps_and_completes_past_the_last(
    store: Store,
) -> None:
    wf = await store.create_workflow("Deploy", ["build", "test"], "admin")

    first = await store.advance(wf.id, "admin")
    assert (first.status, first.current_step) == (Status.RUNNING, 1)
    assert first.steps[0].state is StepState.RUNNING
    assert first.steps[0].started_at is not None

    second = await store.advance(wf.id, "admin", "testing")
    assert second.current_step == 2
    assert second.steps[0].state is StepState.DONE
    assert second.steps[0].finished_at is not None
    assert second.message == "testing"

    done = await store.advance(wf.id, "admin")
    assert (done.status, done.current_step, done.percent) == (Status.COMPLETED, 2, 100)
    assert [s.state for s in done.steps] == [StepState.DONE, StepState.DONE]


async def test_completed_is_final_until_reopened(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["only"], "admin")
    await store.advance(wf.id, "admin")
    await store.advance(wf.id, "admin")

    with pytest.raises(RuleViolation):
        await store.advance(wf.id, "admin")
    with pytest.raises(RuleViolation):
        await store.set_status(wf.id, Status.RUNNING, "admin")
    assert (await store.get_workflow(wf.id)).current_step == 1

    reopened = await store.reopen(wf.id, "admin")
    assert reopened.status is Status.RUNNING
    assert reopened.steps[0].state is StepState.RUNNING


@pytest.mark.parametrize("final", [Status.FAILED, Status.CANCELLED])
async def test_failed_and_cancelled_are_final(store: Store, final: Status) -> None:
    wf = await store.create_workflow("Deploy", ["a", "b"], "admin")
    await store.advance(wf.id, "admin")

    ended = await store.set_status(wf.id, final, "admin")

    assert ended.steps[0].state.value == final.value
    with pytest.raises(RuleViolation):
        await store.advance(wf.id, "admin")
    with pytest.raises(RuleViolation):
        await store.set_status(wf.id, Status.PAUSED, "admin")


async def test_step_never_goes_back_except_by_reset(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["a", "b", "c"], "admin")
    await store.advance(wf.id, "admin")
    await store.advance(wf.id, "admin")

    with pytest.raises(RuleViolation):
        await store.set_status(wf.id, Status.PENDING, "admin")
    assert (await store.get_workflow(wf.id)).current_step == 2

    reset = await store.reset(wf.id, "admin")
    assert (reset.status, reset.current_step) == (Status.PENDING, 0)
    assert all(
        s.state is StepState.PENDING and s.started_at is None for s in reset.steps
    )


async def test_completing_by_status_skips_the_remaining_steps(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["a", "b", "c"], "admin")
    await store.advance(wf.id, "admin")

    done = await store.set_status(wf.id, Status.COMPLETED, "admin")

    assert [s.state for s in done.steps] == [
        StepState.DONE,
        StepState.SKIPPED,
        StepState.SKIPPED,
    ]


async def test_every_change_raises_seq_by_one_and_logs_an_event(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["a", "b"], "admin")
    await store.advance(wf.id, "admin")
    await store.set_message(wf.id, "hello", "bot")
    await store.set_status(wf.id, Status.PAUSED, "admin")

    history = await store.history(wf.id, 10)

    assert [e.seq for e in history] == [4, 3, 2, 1]
    assert [e.kind for e in history] == ["status", "message", "advanced", "created"]
    assert history[1].actor == "bot"
    assert history[1].summary == "Message: hello"
    assert (await store.get_workflow(wf.id)).seq == 4


async def test_events_after_returns_the_missed_payloads_in_order(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["a", "b", "c"], "admin")
    for _ in range(3):
        await store.advance(wf.id, "admin")

    events = await store.events_after(wf.id, 2, 100)

    assert [seq for seq, _ in events] == [3, 4]
    assert '"current_step":3' in events[-1][1]


async def test_refused_change_leaves_no_event(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["a"], "admin")

    with pytest.raises(InvalidInput):
        await store.set_message(wf.id, "x" * 5000, "admin")

    assert [e.seq for e in await store.history(wf.id, 10)] == [1]


async def test_unknown_workflow_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.advance("missing", "admin")
    with pytest.raises(NotFound):
        await store.get_workflow("missing")


async def test_concurrent_changes_are_serialised_and_none_is_lost(store: Store) -> None:
    wf = await store.create_workflow("Busy", [f"s{i}" for i in range(60)], "admin")
    seen: list[Change] = []
    store.add_listener(seen.append)

    await asyncio.gather(
        *(store.advance(wf.id, "admin") for _ in range(40)),
        *(store.set_message(wf.id, f"m{i}", "admin") for i in range(20)),
    )

    final = await store.get_workflow(wf.id)
    assert final.seq == 61
    assert final.current_step == 40
    assert [c.seq for c in seen] == list(range(2, 62))


async def test_listeners_hear_only_committed_changes(store: Store) -> None:
    wf = await store.create_workflow("Deploy", ["a"], "admin")
    seen: list[Change] = []
    store.add_listener(seen.append)

    with pytest.raises(InvalidInput):
        await store.advance(wf.id, "admin", "\x1b[31m")
    await store.advance(wf.id, "admin")

    assert [c.seq for c in seen] == [2]


async def test_list_puts_the_latest_change_first(store: Store) -> None:
    first = await store.create_workflow("first", ["a", "b"], "admin")
    await store.create_workflow("second", ["a"], "admin")
    await store.advance(first.id, "admin")

    names = [w.name for w in await store.list_workflows()]

    assert names == ["first", "second"]


async def test_a_gate_past_its_timeout_is_due(store: Store) -> None:
    gate = {"name": "ship", "gate": {"timeout_s": 60}}
    wf = await store.create_workflow("gated", ["build", gate], "admin")
    await store.advance(wf.id, "admin")
    await store.advance(wf.id, "admin")

    gates, stalls = await store.due("9999-12-31T00:00:00+00:00")

    assert (gates, stalls) == ([wf.id], [])
    assert (await store.get_workflow(wf.id)).status is Status.WAITING


async def test_prune_keeps_only_each_live_workflow_newest_event(store: Store) -> None:
    finished = await store.create_workflow("finished", ["a"], "admin")
    await store.advance(finished.id, "admin")
    await store.advance(finished.id, "admin")
    running = await store.create_workflow("running", ["a", "b"], "admin")
    await store.advance(running.id, "admin")

    assert await store.prune("9999-12-31T00:00:00+00:00", batch=1) == (1, 1)

    assert [w.name for w in await store.list_workflows()] == ["running"]
    assert [e.seq for e in await store.history(running.id, 10)] == [2]


async def test_prune_takes_only_events_from_before_the_cutoff(store: Store) -> None:
    wf = await store.create_workflow("steady", ["a"], "admin")
    for i in range(6):
        await store.set_message(wf.id, f"m{i}", "admin")
    events = await store.history(wf.id, 10)
    cutoff = events[3].at  # the fourth newest

    await store.prune(cutoff)

    kept = [e.seq for e in await store.history(wf.id, 10)]
    assert kept == [e.seq for e in events if e.at >= cutoff]
    assert kept[-1] <= events[3].seq


async def test_tokens_and_sessions_are_kept_and_revoked(store: Store) -> None:
    credentials = Credentials(store)
    token, secret = await credentials.create_token("ci", Scope.PUBLISH_ANY)
    await credentials.add_session("session-secret", "9999-12-31T00:00:00+00:00")

    found = await credentials.find(secret)
    assert found is not None and found.name == "ci"
    assert [t.id for t in await credentials.list_tokens()] == [token.id]
    assert await credentials.session_valid("session-secret")

    await credentials.revoke(token.id)
    with pytest.raises(NotFound):
        await credentials.revoke(token.id)
    assert await credentials.find(secret) is None


async def test_webhooks_are_kept_and_removed(store: Store, tmp_path: Path) -> None:
    webhooks = Webhooks(store, make_settings(tmp_path))
    hook = await webhooks.create("https://example.invalid/hook", ["failed"])

    assert [h.url for h in webhooks.all()] == ["https://example.invalid/hook"]
    assert await webhooks.deliveries() == []

    await webhooks.delete(hook.id)
    with pytest.raises(NotFound):
        await webhooks.delete(hook.id)


async def test_file_uses_wal_and_records_its_schema_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "v.db")
    await store.open()
    await store.close()

    conn = sqlite3.connect(tmp_path / "v.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_reopening_a_database_keeps_its_workflows_and_epoch(db: str) -> None:
    first = Store(db)
    await first.open()
    wf = await first.create_workflow("Kept", ["a"], "admin")
    epoch = first.epoch
    await first.close()

    second = Store(db)
    await second.open()
    assert (await second.get_workflow(wf.id)).name == "Kept"
    assert second.epoch == epoch
    await second.close()


async def test_two_stores_on_one_database_share_seqs_and_epoch(db: str) -> None:
    first, second = Store(db), Store(db)
    try:
        await asyncio.gather(first.open(), second.open())
        wf = await first.create_workflow("Shared", [f"s{i}" for i in range(40)], "a")

        await asyncio.gather(
            *(s.advance(wf.id, "admin") for _ in range(10) for s in (first, second))
        )

        assert first.epoch == second.epoch
        history = await second.history(wf.id, 50)
        assert [e.seq for e in history] == list(range(21, 0, -1))
        assert (await first.get_workflow(wf.id)).current_step == 20
    finally:
        await first.close()
        await second.close()


async def test_a_change_waits_for_another_writer_without_holding_the_loop(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "v.db")
    await store.open()
    wf = await store.create_workflow("Shared file", ["a", "b"], "admin")
    other = sqlite3.connect(tmp_path / "v.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        change = asyncio.create_task(store.advance(wf.id, "admin"))
        # The loop goes on while the change waits: this timeout can fire.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(change), 0.3)
        other.execute("COMMIT")

        assert (await change).current_step == 1
        assert [e.seq for e in await store.history(wf.id, 5)] == [2, 1]
    finally:
        other.close()
        await store.close()


async def test_a_writer_that_holds_the_file_too_long_gives_503_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlitedb, "BUSY_TIMEOUT_MS", 100)
    store = Store(tmp_path / "v.db")
    await store.open()
    wf = await store.create_workflow("Held", ["a", "b"], "admin")
    other = sqlite3.connect(tmp_path / "v.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Unavailable) as refused:
            await store.advance(wf.id, "admin")
        other.execute("COMMIT")

        assert refused.value.status == 503 and refused.value.retry_after_s > 0
        assert (await store.advance(wf.id, "admin")).seq == 2
    finally:
        other.close()
        await store.close()


async def test_a_read_held_open_elsewhere_stops_the_log_starting_over_and_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlitedb, "CHECKPOINT_PAGES", 100)
    monkeypatch.setattr(sqlitedb, "LOG_LIMIT_FRAMES", 200)
    store = Store(tmp_path / "v.db")
    await store.open()
    wf = await store.create_workflow("Read elsewhere", ["a"], "admin")
    reader = sqlite3.connect(tmp_path / "v.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchone()  # holds its snapshot
    try:
        for batch in range(10):
            await asyncio.gather(
                *(store.set_message(wf.id, f"{batch} {i}", "admin") for i in range(50))
            )

        assert (await store.get_workflow(wf.id)).seq == 501
        assert "cannot start over" in caplog.text
    finally:
        reader.close()
        await store.close()


async def test_a_large_log_left_by_an_earlier_run_is_cut_back_at_start(
    tmp_path: Path,
) -> None:
    db = tmp_path / "v.db"
    store = Store(db)
    await store.open()
    await store.close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE filler (text TEXT)")
    conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 4000,)] * 5000)
    log = tmp_path / "v.db-wal"
    grown = log.stat().st_size
    store = Store(db)  # while the connection that wrote the log is still open
    await store.open()
    try:
        assert grown > 20_000_000
        assert log.stat().st_size < grown / 10
    finally:
        conn.close()
        await store.close()


async def test_the_log_file_stays_bounded_under_steady_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlitedb, "CHECKPOINT_PAGES", 400)
    monkeypatch.setattr(sqlitedb, "LOG_LIMIT_FRAMES", 1000)
    store = Store(tmp_path / "v.db")
    await store.open()
    wf = await store.create_workflow("Steady", ["a"], "admin")
    log = tmp_path / "v.db-wal"
    try:
        for batch in range(40):
            await asyncio.gather(
                *(
                    store.set_message(wf.id, f"{batch} {i} " + "x" * 1000, "admin")
                    for i in range(100)
                )
            )
        changes = (await store.get_workflow(wf.id)).seq
        # Each change writes at least two pages: its workflow's and its event's.
        # The log would hold them all if it never started over.
        assert log.stat().st_size < changes * 2 * 4096
    finally:
        await store.close()


async def test_events_of_a_file_from_the_previous_release_are_kept_in_order(
    tmp_path: Path,
) -> None:
    db = tmp_path / "old.db"
    step = {"name": "a", "state": "running", "started_at": None, "finished_at": None}
    conn = sqlite3.connect(db)
    conn.executescript("".join(MIGRATIONS[:3]))
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO workflows (id, name, status, current_step, steps, message, "
        "created_at, updated_at, seq) VALUES ('old', 'Old', 'running', 0, ?, '', "
        "'2025-01-01T00:00:00.000+00:00', '2025-01-03T00:00:00.000+00:00', 3)",
        (json.dumps([step]),),
    )
    for seq in (3, 1, 2):  # stored out of order, as the old table allowed
        conn.execute(
            "INSERT INTO events VALUES ('old', ?, 'message', 'admin', ?, 's', '{}')",
            (seq, f"2025-01-0{seq}T00:00:00.000+00:00"),
        )
    conn.commit()
    conn.close()

    store = Store(db)
    await store.open()
    try:
        await store.set_message("old", "new", "admin")
        assert [e.seq for e in await store.history("old", 10)] == [4, 3, 2, 1]

        await store.prune("2025-01-03T00:00:00.000+00:00")

        assert [e.seq for e in await store.history("old", 10)] == [4, 3]
    finally:
        await store.close()


async def test_a_file_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    store = Store(tmp_path / "new.db")
    with pytest.raises(NewerSchema, match="newer"):
        await store.open()
    await store.close()


async def test_a_postgresql_database_records_its_schema_version(
    postgres_url: str,
) -> None:
    store = Store(postgres_url)
    await store.open()

    row = await store.fetch_one("SELECT max(version) FROM schema_version")

    assert row[0] == PG_SCHEMA_VERSION
    await store.close()


async def test_a_postgresql_database_from_a_newer_release_is_refused(
    postgres_url: str,
) -> None:
    store = Store(postgres_url)
    await store.open()
    await store.close()
    run_sql(
        postgres_url,
        "INSERT INTO schema_version (version, applied_at) "
        f"VALUES ({PG_SCHEMA_VERSION + 1}, 'later')",
    )

    store = Store(postgres_url)
    with pytest.raises(NewerSchema, match="newer"):
        await store.open()
    await store.close()


def test_ids_never_start_with_a_dash() -> None:
    from vapora.store import new_workflow_id

    assert not any(new_workflow_id().startswith("-") for _ in range(5000))
