"""Running it for years: settings, metrics, health, logs, retention, proxies, files."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vapora.schema import MIGRATIONS, SCHEMA_VERSION
from vapora.settings import Settings
from vapora.store import Store

from .conftest import ADMIN_TOKEN, AUTH, ServerProcess, create_workflow
from .test_admin import CSRF
from .test_ws import advance

ROOT = Path(__file__).resolve().parent.parent

# -- settings --------------------------------------------------------------------


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "vapora.toml"
    config.write_text('port = 9001\nhost = "0.0.0.0"\nheartbeat_s = 5.5\n')

    settings = Settings.load(
        {"port": 9003}, environ={"VAPORA_HOST": "127.0.0.2"}, config=config
    )

    assert (settings.port, settings.host, settings.heartbeat_s) == (
        9003,
        "127.0.0.2",
        5.5,
    )
    assert settings.db == "./vapora.db"


@pytest.mark.parametrize(
    ("given", "environ", "toml", "named"),
    [
        ({}, {"VAPORA_HEARTBEAT_S": "soon"}, "", "VAPORA_HEARTBEAT_S: 'soon'"),
        ({}, {"VAPORA_READ_ACCESS": "secret"}, "", "read_access must be one of"),
        ({}, {}, "max_body_bytes = -1\n", "max_body_bytes must not be negative"),
        ({}, {}, "colour = 'blue'\n", "unknown setting 'colour'"),
        ({}, {}, "port = [\n", "not valid TOML"),
        ({"base_path": "vapora/"}, {}, "", "base_path"),
        (
            {"heartbeat_s": "nan"},
            {},
            "",
            "--heartbeat-s: heartbeat_s must be a finite number",
        ),
        ({}, {"VAPORA_HEARTBEAT_S": "inf"}, "", "heartbeat_s must be a finite number"),
        ({}, {}, "heartbeat_s = -inf\n", "heartbeat_s must be a finite number"),
        ({"prune_interval_s": 0.0}, {}, "", "prune_interval_s must be 1 to"),
        ({"timer_interval_s": 0.0}, {}, "", "timer_interval_s must be 0.01 to"),
        ({"presence_interval_s": 0.0}, {}, "", "presence_interval_s must be"),
        (
            {"retention_days": 1e10},
            {},
            "",
            "retention_days must be 0.001 to 36500 days",
        ),
        ({}, {"VAPORA_WEBHOOK_ATTEMPTS": "5000"}, "", "webhook_attempts must be"),
        # aiohttp reads a size limit of 0 as no limit at all.
        ({"max_body_bytes": 0}, {}, "", "max_body_bytes must be 1024 to"),
        ({"max_incoming_bytes": 0}, {}, "", "max_incoming_bytes must be 64 to"),
        ({"max_connections_per_address": 0}, {}, "", "must be 1 to 1000000"),
        (
            {"trusted_proxies": "127.0.0.1, notanip"},
            {},
            "",
            "trusted_proxies must list IP addresses, got 'notanip'",
        ),
        (
            {"allowed_origins": "https://ok.example, evil"},
            {},
            "",
            "allowed_origins must list origins such as https://example.com, got 'evil'",
        ),
        (
            {"allowed_origins": "https://ok.example/path"},
            {},
            "",
            "got 'https://ok.example/path'",
        ),
        ({"allowed_origins": "https://*.example"}, {}, "", "got 'https://*.example'"),
        # Compared as text with the Origin header, which never looks like these.
        (
            {"allowed_origins": "HTTPS://OK.EXAMPLE:443"},
            {},
            "",
            "write 'HTTPS://OK.EXAMPLE:443' as 'https://ok.example'",
        ),
        (
            {"trusted_proxies": "::FFFF:127.0.0.1"},
            {},
            "",
            "write '::FFFF:127.0.0.1' as '::ffff:7f00:1'",
        ),
        ({}, {}, "max_connections_per_address = true\n", "is not a valid int"),
        ({"admin_token": "s3cret "}, {}, "", "admin_token must not start or end"),
    ],
)
def test_bad_settings_are_named_with_their_value(
    tmp_path: Path,
    given: dict[str, Any],
    environ: dict[str, str],
    toml: str,
    named: str,
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)

    with pytest.raises(ValueError, match=re.escape(named)):
        Settings.load(given, environ=environ, config=config)


def test_proxies_and_origins_take_addresses_and_origins() -> None:
    settings = Settings.load(
        {
            "trusted_proxies": "127.0.0.1, ::1",
            "allowed_origins": "https://ok.example, http://[::1]:8080/",
        },
        environ={},
    )

    assert settings.proxies == {"127.0.0.1", "::1"}
    assert settings.origins == {"https://ok.example", "http://[::1]:8080"}


def test_zero_still_turns_off_retention_and_freezing() -> None:
    settings = Settings.load(
        {"retention_days": 0.0, "gc_freeze_interval_s": 0.0}, environ={}
    )

    assert (settings.retention_days, settings.gc_freeze_interval_s) == (0.0, 0.0)


def test_serve_help_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vapora", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )

    for f in Settings.declared():
        assert f"--{f.name.replace('_', '-')}" in result.stdout
        assert f"VAPORA_{f.name.upper()}" in result.stdout


def test_config_file_is_read_by_serve(server_process: Any, tmp_path: Path) -> None:
    config = tmp_path / "vapora.toml"
    config.write_text('read_access = "private"\n')

    server: ServerProcess = server_process("--config", str(config))

    assert any("reading private" in line for line in server.log)


# -- metrics and health -----------------------------------------------------------


def parse_metrics(text: str) -> dict[str, Any]:
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + json.dumps(sample.labels, sort_keys=True)
            samples[key] = sample.value
    return samples


async def test_metrics_are_valid_prometheus_text_and_count_real_traffic(
    client: TestClient[Any, Any],
) -> None:
    wf = await create_workflow(client)
    async with client.ws_connect(f"/api/workflows/{wf['workflow_id']}/updates") as ws:
        await ws.receive_json(timeout=5)
        await advance(client, wf["workflow_id"])
        await ws.receive_json(timeout=5)

        response = await client.get("/metrics")
        samples = parse_metrics(await response.text())

    assert response.status == 200
    assert samples['vapora_open_connections{"transport": "WebSocket"}'] == 1
    assert samples["vapora_subscribers{}"] == 1
    assert samples["vapora_watched_workflows{}"] == 1
    assert samples["vapora_frames_sent_total{}"] >= 1
    route = '{"route": "/api/workflows/{workflow_id}/advance", "status": "200"}'
    assert samples["vapora_http_requests_total" + route] == 1
    assert samples["vapora_store_write_seconds_count{}"] == 2
    assert samples["vapora_publish_to_send_seconds_count{}"] >= 1
    assert samples['vapora_publish_to_send_seconds_bucket{"le": "+Inf"}'] >= 1
    assert samples['vapora_resumes_total{"served_from": "log"}'] == 0


async def test_resumes_are_counted_by_how_they_were_served(app_factory: Any) -> None:
    client = await app_factory(max_resume_events=2)
    wf = await create_workflow(client, steps=5)
    wid = wf["workflow_id"]
    for _ in range(4):
        await advance(client, wid)
    page = await client.get(f"/workflows/{wid}")
    match = re.search(r'data-epoch="(\w+)"', await page.text())
    assert match

    for after in (4, 1):
        url = f"/api/workflows/{wid}/updates?after={after}&epoch={match[1]}"
        async with client.ws_connect(url) as ws:
            await ws.receive_json(timeout=5)
    samples = parse_metrics(await (await client.get("/metrics")).text())

    assert samples['vapora_resumes_total{"served_from": "log"}'] == 1
    assert samples['vapora_resumes_total{"served_from": "snapshot"}'] == 1


async def test_healthz_and_readyz(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")

    assert ready.status == 200
    assert (await ready.json())["status"] == "ok"


async def test_readyz_is_503_while_the_database_refuses_writes(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    blocker = sqlite3.connect(settings.db, timeout=10)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        response = await client.get("/readyz")
    finally:
        blocker.rollback()
        blocker.close()

    assert response.status == 503
    assert "database" in (await response.json())["reason"]
    assert (await client.get("/readyz")).status == 200


# -- logs ----------------------------------------------------------------------


def test_json_logs_are_one_object_a_line_and_hold_no_secret(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process("--log-format", "json")
    assert server.stop() == 0

    entries = [json.loads(line) for line in server.log if line.strip()]

    assert any("serving http://" in e["message"] for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert ADMIN_TOKEN not in "".join(server.log)


async def test_info_log_has_no_line_per_request_or_frame(server_process: Any) -> None:
    server: ServerProcess = server_process()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.url}/api/workflows",
            json={"name": "quiet", "steps": ["a"]},
            headers=AUTH,
        ) as response:
            wid = (await response.json())["workflow_id"]
        async with session.ws_connect(
            f"{server.url}/api/workflows/{wid}/updates"
        ) as ws:
            await ws.receive_json(timeout=5)
            for _ in range(20):
                async with session.post(
                    f"{server.url}/api/workflows/{wid}/message",
                    json={"message": "tick"},
                    headers=AUTH,
                ):
                    pass
            for _ in range(20):
                await ws.receive_json(timeout=5)
    before = len(server.log)
    assert server.stop() == 0

    assert before <= 4, "".join(server.log)


# -- retention -------------------------------------------------------------------


def ago(**delta: float) -> str:
    return (datetime.now(UTC) - timedelta(**delta)).isoformat(timespec="milliseconds")


async def test_prune_drops_old_finished_workflows_and_old_events(store: Store) -> None:
    finished = await store.create_workflow("finished", ["a"], "admin")
    await store.advance(finished.id, "admin")
    await store.advance(finished.id, "admin")
    running = await store.create_workflow("running", ["a", "b", "c"], "admin")
    await store.advance(running.id, "admin")
    await store.advance(running.id, "admin")

    workflows, events = await store.prune(ago(seconds=-1))

    assert workflows == 1
    assert events == 2
    assert [w.name for w in await store.list_workflows()] == ["running"]
    kept = await store.get_workflow(running.id, history=10)
    assert [e.seq for e in kept.history] == [3]
    assert kept.current_step == 2


async def test_prune_keeps_what_is_younger_than_the_cutoff(store: Store) -> None:
    wf = await store.create_workflow("young", ["a"], "admin")
    await store.advance(wf.id, "admin")
    await store.advance(wf.id, "admin")

    assert await store.prune(ago(days=1)) == (0, 0)
    assert len((await store.get_workflow(wf.id, history=10)).history) == 3


async def test_database_stops_growing_under_steady_load_with_retention(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "steady.db")
    await store.open()
    sizes = []
    for _ in range(12):
        for _ in range(5):
            wf = await store.create_workflow("job", [f"s{i}" for i in range(20)], "bot")
            for i in range(20):
                await store.advance(wf.id, "bot", f"step {i} " + "x" * 200)
            await store.advance(wf.id, "bot")
        await store.prune(ago(seconds=-1))
        await store.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes.append((tmp_path / "steady.db").stat().st_size)
    await store.close()
    print(f"\ndatabase size after each round: {sizes}")

    # Each round writes over 100 KB of events; after the first rounds, freed
    # pages are reused and the file grows by a few pages at most.
    assert sizes[-1] - sizes[3] <= 8 * 4096, sizes


# -- behind a proxy ---------------------------------------------------------------


async def test_every_link_form_and_socket_honours_the_base_path(
    app_factory: Any,
) -> None:
    client = await app_factory(base_path="/vapora")

    created = await client.post(
        "/vapora/api/workflows", json={"name": "w", "steps": ["a"]}, headers=AUTH
    )
    wid = (await created.json())["workflow_id"]
    page = await (await client.get(f"/vapora/workflows/{wid}")).text()
    index = await (await client.get("/vapora/")).text()
    login = await client.get("/vapora/admin", allow_redirects=False)
    outside = await client.get("/")

    assert created.status == 201
    assert created.headers["Location"] == f"/vapora/api/workflows/{wid}"
    for html in (page, index):
        for url in re.findall(r'(?:href|src|action|data-[a-z-]+)="(/[^"]*)"', html):
            assert url.startswith("/vapora/"), url
    assert f'data-socket="/vapora/api/workflows/{wid}/updates"' in page
    assert login.headers["Location"] == "/vapora/admin/login"
    assert outside.status == 404
    async with client.ws_connect(f"/vapora/api/workflows/{wid}/updates") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    assert (await client.get("/vapora/static/vapora.js")).status == 200


async def test_admin_forms_and_cookies_stay_under_the_base_path(
    app_factory: Any,
) -> None:
    client = await app_factory(base_path="/vapora")
    login = await client.get("/vapora/admin/login")
    csrf = CSRF.search(await login.text())
    assert csrf and 'action="/vapora/admin/login"' in await login.text()

    signed_in = await client.post(
        "/vapora/admin/login",
        data={"csrf_token": csrf[1], "token": ADMIN_TOKEN},
        allow_redirects=False,
    )
    admin = await client.get("/vapora/admin")
    signed_out = await client.post(
        "/vapora/admin/logout", data={"csrf_token": csrf[1]}, allow_redirects=False
    )
    created = await client.post(
        "/vapora/api/workflows", json={"name": "w", "steps": ["a"]}, headers=AUTH
    )
    wid = (await created.json())["workflow_id"]
    body = {"name": "link", "scope": "read", "workflow_id": wid}
    link = await (
        await client.post("/vapora/api/tokens", json=body, headers=AUTH)
    ).json()
    shared = await client.get(f"/vapora/share/{link['token']}", allow_redirects=False)

    assert signed_in.headers["Location"] == "/vapora/admin"
    assert admin.status == 200
    # Another application on the same host, outside the prefix, never gets them.
    assert login.cookies["vapora_csrf"]["path"] == "/vapora"
    assert signed_in.cookies["vapora_session"]["path"] == "/vapora"
    assert signed_out.cookies["vapora_session"]["path"] == "/vapora"
    assert shared.cookies[f"vapora_share_{wid}"]["path"] == "/vapora"


async def test_trusted_proxy_gives_the_client_address_and_scheme(
    app_factory: Any,
) -> None:
    client = await app_factory(
        trusted_proxies="127.0.0.1", max_connections_per_address=1
    )
    wf = await create_workflow(client)
    url = f"/api/workflows/{wf['workflow_id']}/updates"
    first = await client.ws_connect(url, headers={"X-Forwarded-For": "203.0.113.7"})

    other = await client.ws_connect(url, headers={"X-Forwarded-For": "203.0.113.8"})
    same = await client.get(
        url,
        headers={
            "X-Forwarded-For": "203.0.113.7",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    client.session.cookie_jar.clear()
    login = await client.get("/admin/login", headers={"X-Forwarded-Proto": "https"})

    assert same.status == 429
    assert login.cookies["vapora_csrf"]["secure"]
    await first.close()
    await other.close()


async def test_trusted_proxy_is_believed_under_the_base_path(app_factory: Any) -> None:
    client = await app_factory(
        base_path="/vapora", trusted_proxies="127.0.0.1", max_connections_per_address=1
    )
    created = await client.post(
        "/vapora/api/workflows", json={"name": "w", "steps": ["a"]}, headers=AUTH
    )
    url = f"/vapora/api/workflows/{(await created.json())['workflow_id']}/updates"
    first = await client.ws_connect(url, headers={"X-Forwarded-For": "203.0.113.7"})

    other = await client.ws_connect(url, headers={"X-Forwarded-For": "203.0.113.8"})
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(url, headers={"X-Forwarded-For": "203.0.113.7"})
    login = await client.get(
        "/vapora/admin/login", headers={"X-Forwarded-Proto": "https"}
    )

    assert refused.value.status == 429
    assert login.cookies["vapora_csrf"]["secure"]
    await first.close()
    await other.close()


async def test_forwarded_headers_from_anyone_else_are_ignored(
    client: TestClient[Any, Any],
) -> None:
    login = await client.get("/admin/login", headers={"X-Forwarded-Proto": "https"})

    assert not login.cookies["vapora_csrf"]["secure"]


# -- files -------------------------------------------------------------------------


def test_database_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:-1]:
        for statement in migration.split(";"):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    steps = json.dumps(
        [{"name": "a", "state": "running", "started_at": None, "finished_at": None}]
    )
    conn.execute(
        "INSERT INTO workflows (id, name, status, current_step, steps, message, "
        "created_at, updated_at, seq) VALUES ('oldworkflow1', 'Old', 'running', 1, "
        "?, 'hi', '2025-01-01T00:00:00.000+00:00', '2025-01-01T00:00:00.000+00:00', 1)",
        (steps,),
    )
    conn.commit()
    conn.close()

    async def reopen() -> None:
        store = Store(db)
        await store.open()
        workflow = await store.get_workflow("oldworkflow1")
        assert (workflow.name, workflow.message) == ("Old", "hi")
        await store.advance("oldworkflow1", "admin")
        await store.close()

    asyncio.run(reopen())
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM webhooks").fetchone()[0] == 0


async def test_restored_backup_makes_resuming_clients_resync(
    server_process: Any, tmp_path: Path
) -> None:
    server: ServerProcess = server_process()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.url}/api/workflows",
            json={"name": "r", "steps": ["a"]},
            headers=AUTH,
        ) as response:
            wid = (await response.json())["workflow_id"]
        copy = tmp_path / "backup.db"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vapora",
                "backup",
                str(copy),
                "--db",
                str(server.db),
            ],
            check=True,
            capture_output=True,
        )
        async with session.ws_connect(
            f"{server.url}/api/workflows/{wid}/updates"
        ) as ws:
            before = await ws.receive_json(timeout=5)
        assert server.stop() == 0

        restored: ServerProcess = server_process(db=copy)
        url = f"{restored.url}/api/workflows/{wid}/updates"
        async with session.ws_connect(
            f"{url}?after={before['seq']}&epoch={before['epoch']}"
        ) as ws:
            first = await ws.receive_json(timeout=5)

    assert (first["type"], first["reason"]) == ("snapshot", "resync")
    assert first["epoch"] != before["epoch"]


def test_single_file_build_serves_pages(tmp_path: Path) -> None:
    target = tmp_path / "vapora.pyz"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "shiv",
            "-c",
            "vapora",
            "-o",
            str(target),
            "--compressed",
            "-q",
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    env = dict(
        os.environ, VAPORA_ADMIN_TOKEN=ADMIN_TOKEN, SHIV_ROOT=str(tmp_path / "shiv")
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            str(target),
            "serve",
            "--port",
            "0",
            "--db",
            str(tmp_path / "x.db"),
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = next(line for line in proc.stderr if "serving" in line)
        url = re.search(r"(http://\S+?)/ ", line)
        assert url

        async def fetch() -> tuple[int, str]:
            async with aiohttp.ClientSession() as session:
                async with session.get(url[1] + "/static/vapora.js") as js:
                    async with session.get(url[1] + "/") as page:
                        return js.status, await page.text()

        status, html = asyncio.run(fetch())
        assert status == 200
        assert "<h1>Workflows</h1>" in html
    finally:
        proc.terminate()
        proc.wait(10)


async def test_garbage_collection_pauses_are_measured(
    client: TestClient[Any, Any],
) -> None:
    gc.collect()

    samples = parse_metrics(await (await client.get("/metrics")).text())

    assert samples["vapora_gc_pause_seconds_count{}"] >= 1
    assert samples["vapora_gc_pause_max_seconds{}"] > 0


async def test_long_lived_objects_are_frozen_out_of_collections(
    app_factory: Any,
) -> None:
    gc.unfreeze()
    await app_factory(gc_freeze_interval_s=0.05)
    try:
        async with asyncio.timeout(5):
            while gc.get_freeze_count() == 0:
                await asyncio.sleep(0.01)
    finally:
        gc.unfreeze()
