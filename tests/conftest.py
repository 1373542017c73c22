"""Fixtures: each test gets its own SQLite file and real servers on 127.0.0.1.

Tests that need PostgreSQL or Redis get throwaway servers started from the
installed binaries, on free ports, with their files in a temporary folder (or
the servers named by VAPORA_TEST_DATABASE_URL and VAPORA_TEST_REDIS_URL).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient

from vapora.app import create_app
from vapora.settings import Settings
from vapora.store import Store

ADMIN_TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "db": str(tmp_path / "vapora.db"),
        "admin_token": ADMIN_TOKEN,
        "port": 0,
        # Every test client connects from 127.0.0.1.
        "max_connections_per_address": 10_000,
        # Presence frames come only where a test asks for them.
        "presence_interval_s": 3600.0,
        # Freezing objects is for a server's process, not the test runner's.
        "gc_freeze_interval_s": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(tmp_path / "store.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, settings: Settings
) -> TestClient[Any, Any]:
    """A client of the app running on a real socket on 127.0.0.1."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def app_factory(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """Start the app with some settings changed."""

    async def start(**overrides: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(make_settings(tmp_path, **overrides)))

    return start


async def create_workflow(
    client: TestClient[Any, Any], name: str = "Deploy", steps: int = 3
) -> dict[str, Any]:
    response = await client.post(
        "/api/workflows",
        json={"name": name, "steps": [f"step {i}" for i in range(1, steps + 1)]},
        headers=AUTH,
    )
    assert response.status == 201, await response.text()
    return dict(await response.json())


@dataclass
class ServerProcess:
    """`vapora serve` running as a child process."""

    proc: subprocess.Popen[str]
    url: str
    db: Path
    log: list[str]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


URL_LINE = re.compile(r"serving (http://[^/ ]+)\S* ")


def start_server(
    db: Path, *args: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """Run `python -m vapora serve` and wait for its start-up line."""
    full_env = dict(
        os.environ,
        VAPORA_ADMIN_TOKEN=ADMIN_TOKEN,
        VAPORA_MAX_CONNECTIONS_PER_ADDRESS="10000",
        PYTHONUNBUFFERED="1",
    )
    full_env.update(env or {})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vapora",
            "serve",
            "--port",
            "0",
            "--db",
            str(db),
            *args,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=full_env,
    )
    assert proc.stderr is not None
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        match = URL_LINE.search(line)
        if match:
            # Keep reading, so a chatty server never blocks on a full pipe.
            threading.Thread(
                target=log.extend, args=(proc.stderr,), daemon=True
            ).start()
            return ServerProcess(proc, match.group(1), db, log)
    proc.wait()
    raise AssertionError("server exited before it was ready:\n" + "".join(log))


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real `vapora serve` processes; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, db: Path | None = None, **kwargs: Any) -> ServerProcess:
        server = start_server(db or tmp_path / "served.db", *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


# -- throwaway PostgreSQL and Redis servers ------------------------------------


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose server cannot be had here; under CI, fail it instead."""
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: (
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def run_sql(url: str, sql: str) -> None:
    """Run one statement on the server at url, from outside any event loop."""
    import asyncpg  # type: ignore[import-untyped]

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the whole run: the URL of its first database."""
    given = os.environ.get("VAPORA_TEST_DATABASE_URL")
    if given:
        yield given
        return
    bindir = postgres_bin()
    if bindir is None:
        unavailable(
            "PostgreSQL is not installed (apt-get install postgresql) "
            "and VAPORA_TEST_DATABASE_URL is not set"
        )
    folder = Path(tempfile.mkdtemp(prefix="vapora-pg-"))
    as_owner: list[str | Path] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root.
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root, and there is no postgres user to run as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", unused_port()
    subprocess.run(
        [*as_owner, bindir / "initdb", "-D", data, "-U", "vapora", "--auth=trust"]
        + ["-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c full_page_writes=off -c max_connections=200"
    )
    pg_ctl = [*as_owner, bindir / "pg_ctl", "-D", data, "-w", "-t", "30"]
    subprocess.run(
        [*pg_ctl, "-o", options, "-l", folder / "log", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://vapora@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one test."""
    name = "vapora_test_" + secrets.token_hex(6)
    run_sql(postgres_server, f"CREATE DATABASE {name}")
    yield urlsplit(postgres_server)._replace(path="/" + name).geturl()
    run_sql(postgres_server, f"DROP DATABASE {name} WITH (FORCE)")


@dataclass
class RedisServer:
    """A throwaway redis-server on a port of its own, which a test may restart."""

    binary: str
    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of its own for one test, started from the installed binary."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("Redis is not installed (apt-get install redis-server)")
    server = RedisServer(binary, unused_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of a Redis server for one test, or VAPORA_TEST_REDIS_URL."""
    given = os.environ.get("VAPORA_TEST_REDIS_URL")
    if given:
        return given
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url
