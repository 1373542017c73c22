"""The `vapora` command: start-up, settings, signals and the installed package."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import ADMIN_TOKEN, AUTH, URL_LINE, ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def create(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(
        f"{url}/api/workflows", json={"name": "w", "steps": ["a"]}, headers=AUTH
    ) as response:
        assert response.status == 201
        return str((await response.json())["workflow_id"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_sockets_with_going_away_and_exits(
    server_process: Any, sig: int
) -> None:
    server: ServerProcess = server_process()
    async with aiohttp.ClientSession() as session:
        workflow_id = await create(session, server.url)
        ws = await session.ws_connect(
            f"{server.url}/api/workflows/{workflow_id}/updates"
        )
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"

        assert (await ws.receive_json(timeout=5))["type"] == "ready"
        server.proc.send_signal(sig)
        msg = await ws.receive(timeout=5)

        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
        await ws.close()
    assert await asyncio.to_thread(server.proc.wait, 5) == 0


async def test_settings_come_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    env = dict(
        os.environ,
        VAPORA_HOST="127.0.0.1",
        VAPORA_PORT=str(port),
        VAPORA_DB=str(tmp_path / "env.db"),
        VAPORA_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "vapora", "serve"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = next(line for line in proc.stderr if "serving" in line)
        assert f"http://127.0.0.1:{port}/" in line
        assert (tmp_path / "env.db").exists()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_bad_setting_is_named_with_its_value(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vapora", "serve", "--db", str(tmp_path / "x.db")],
        env=dict(os.environ, VAPORA_PORT="eighty"),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "VAPORA_PORT" in result.stderr and "'eighty'" in result.stderr


async def test_generated_admin_token_is_logged_once_and_never_stored(
    server_process: Any, tmp_path: Path
) -> None:
    db = tmp_path / "gen.db"
    env = {"VAPORA_ADMIN_TOKEN": ""}
    first: ServerProcess = server_process(db=db, env=env)
    line = next(line for line in first.log if "Generated the admin token" in line)
    token = line.split("this once: ")[1].split()[0]

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{first.url}/api/workflows",
            json={"name": "w", "steps": ["a"]},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 201
    assert first.stop() == 0

    second: ServerProcess = server_process(db=db, env=env)
    assert second.stop() == 0
    assert not any("Generated" in line for line in second.log)
    stored = (
        sqlite3.connect(db).execute("SELECT group_concat(value) FROM meta").fetchone()
    )
    assert token not in stored[0]


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "vapora",
                "serve",
                "--port",
                str(port),
                "--db",
                str(tmp_path / "x.db"),
            ],
            env=dict(os.environ, VAPORA_ADMIN_TOKEN=ADMIN_TOKEN),
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert result.returncode == 1
    assert "Cannot start" in result.stderr


def test_built_wheel_carries_templates_and_static(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("vapora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "vapora/templates/workflow.html" in names
    assert "vapora/static/vapora.js" in names

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vapora.app import asset_dir; print(asset_dir('templates'))",
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == str(target / "vapora" / "templates")


def test_start_up_line_names_the_url(server_process: Any) -> None:
    server: ServerProcess = server_process()

    lines = [line for line in server.log if URL_LINE.search(line)]

    assert len(lines) == 1
    assert server.url.startswith("http://127.0.0.1:")


def run_vapora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vapora", *args],
        env=dict(os.environ, VAPORA_ADMIN_TOKEN=ADMIN_TOKEN),
        capture_output=True,
        text=True,
        timeout=30,
    )


def newer_database(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 999")
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: tmp / "missing" / "x.db", "does not exist"),
        (lambda tmp: tmp / "notes.txt", "not a database"),
        (lambda tmp: newer_database(tmp / "new.db"), "newer than this Vapora"),
    ],
)
def test_a_database_that_cannot_be_used_is_one_clear_line(
    tmp_path: Path, make: Any, problem: str
) -> None:
    (tmp_path / "notes.txt").write_text("shopping list: " + "eggs " * 200)
    db = make(tmp_path)

    result = run_vapora("serve", "--port", "0", "--db", str(db))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"--db {db}" in lines[0] and problem in lines[0]


def test_backup_takes_the_same_db_forms_as_serve(
    server_process: Any, tmp_path: Path
) -> None:
    served = tmp_path / "run1" / "vapora.db"
    served.parent.mkdir()
    server: ServerProcess = server_process("--db", f"sqlite:///{served}", db=served)
    assert server.proc.poll() is None

    result = run_vapora(
        "backup", str(tmp_path / "copy.db"), "--db", f"sqlite:///{served}"
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "copy.db").exists()


def test_backup_into_a_missing_folder_names_it(tmp_path: Path) -> None:
    db = tmp_path / "vapora.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE workflows (id TEXT)")

    result = run_vapora("backup", str(tmp_path / "gone" / "copy.db"), "--db", str(db))

    assert result.returncode == 1
    assert str(tmp_path / "gone") in result.stderr
    assert not list(tmp_path.glob("**/*.partial"))


def test_a_request_the_client_got_wrong_is_one_warning_line(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process()
    host, port = server.url.removeprefix("http://").split(":")
    broken = [
        # A body that fails to inflate, read by aiohttp after the answer.
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 7\r\n\r\ngarbage",
        b"POST /api/workflows HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n",
    ]

    for request in broken:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            assert sock.recv(100).split()[1].startswith(b"4")
    deadline = time.monotonic() + 10
    while sum("WARNING aiohttp.server" in line for line in server.log) < 2:
        assert time.monotonic() < deadline, "".join(server.log)
        time.sleep(0.05)
    server.stop()

    assert not [line for line in server.log if "Traceback" in line or " ERROR " in line]
