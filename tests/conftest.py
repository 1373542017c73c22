"""Fixtures: each test gets its own SQLite file and real servers on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
