"""The API commands (`vapora create`, `advance`, ..., `watch`) against a real server."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import ADMIN_TOKEN, AUTH, ServerProcess
from .test_cli import free_port

LINE_TIMEOUT_S = 15
EXIT_TIMEOUT_S = 20


def cli_env(url: str, token: str = ADMIN_TOKEN) -> dict[str, str]:
    return dict(os.environ, VAPORA_URL=url, VAPORA_TOKEN=token, PYTHONUTF8="1")


async def vapora(
    url: str, *args: str, token: str = ADMIN_TOKEN
) -> tuple[int, str, str]:
    """Run `vapora ARGS` as a child process; return its exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vapora",
        *args,
        env=cli_env(url, token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def api(url: str, method: str, path: str, **body: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, f"{url}{path}", json=body or None, headers=AUTH
        ) as response:
            assert response.status < 300, await response.text()
            return dict(await response.json())


async def create(url: str, steps: int = 3) -> str:
    names = [f"step {i}" for i in range(1, steps + 1)]
    workflow = await api(url, "POST", "/api/workflows", name="Deploy", steps=names)
    return str(workflow["workflow_id"])


class Watch:
    """`vapora watch` running as a child process, read one line at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        """The next line on stdout: each is one change the watcher followed."""
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), LINE_TIMEOUT_S)
        if not raw:
            assert self.proc.stderr is not None
            error = await self.proc.stderr.read()
            raise AssertionError(f"watch closed its output: {error.decode()}")
        return raw.decode().rstrip("\n")

    async def error_line(self) -> str:
        assert self.proc.stderr is not None
        raw = await asyncio.wait_for(self.proc.stderr.readline(), LINE_TIMEOUT_S)
        return raw.decode().rstrip("\n")

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT_S)


StartWatch = Callable[[str, str], Awaitable[Watch]]


@pytest.fixture
async def watch() -> AsyncIterator[StartWatch]:
    """Start `vapora watch` processes; any still running after the test is killed."""
    started: list[Watch] = []

    async def start(url: str, workflow_id: str) -> Watch:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vapora",
            "watch",
            workflow_id,
            env=cli_env(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started.append(Watch(proc))
        return started[-1]

    yield start
    for w in started:
        if w.proc.returncode is None:
            w.proc.kill()
            await w.proc.wait()


# -- create, advance, status, message ----------------------------------------------


async def test_create_prints_the_new_id_alone(server_process: Any) -> None:
    server: ServerProcess = server_process()

    code, out, err = await vapora(
        server.url, "create", "Deploy web", "Build", "Ship", "--message", "Starting"
    )

    assert (code, err) == (0, "")
    workflow_id = out.removesuffix("\n")
    assert "\n" not in workflow_id
    workflow = await api(server.url, "GET", f"/api/workflows/{workflow_id}")
    assert workflow["name"] == "Deploy web"
    assert [s["name"] for s in workflow["steps"]] == ["Build", "Ship"]
    assert workflow["message"] == "Starting"


async def test_advance_status_and_message_print_a_summary_and_change_it(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url)
    path = f"/api/workflows/{workflow_id}"

    step_1 = await vapora(server.url, "advance", workflow_id)
    assert step_1 == (0, "Deploy: Step 1 of 3 (running)\n", "")
    step_2 = await vapora(server.url, "advance", workflow_id, "-m", "Testing")
    assert step_2 == (0, "Deploy: Step 2 of 3 (running) — Testing\n", "")
    assert (await api(server.url, "GET", path))["current_step"] == 2

    waiting = await vapora(server.url, "status", workflow_id, "waiting")
    assert waiting == (0, "Deploy: Step 2 of 3 (waiting) — Testing\n", "")
    assert (await api(server.url, "GET", path))["status"] == "waiting"

    message = await vapora(server.url, "message", workflow_id, "Ask Ann")
    assert message == (0, "Deploy: Step 2 of 3 (waiting) — Ask Ann\n", "")
    assert (await api(server.url, "GET", path))["message"] == "Ask Ann"


async def test_a_bad_token_exits_1_with_the_servers_message(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url)

    code, out, err = await vapora(server.url, "advance", workflow_id, token="wrong")

    assert (code, out, err) == (1, "", "vapora: that token is unknown or revoked\n")
    workflow = await api(server.url, "GET", f"/api/workflows/{workflow_id}")
    assert workflow["current_step"] == 0


async def test_an_unknown_id_exits_1_naming_it(server_process: Any) -> None:
    server: ServerProcess = server_process()

    result = await vapora(server.url, "status", "nosuchflow12", "failed")

    assert result == (1, "", "vapora: no workflow with id 'nosuchflow12'\n")


async def test_an_id_that_begins_with_a_dash_is_read_as_an_id(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process()

    result = await vapora(server.url, "advance", "-m", "-5 °C", "-mFlow12345a")

    assert result == (1, "", "vapora: no workflow with id '-mFlow12345a'\n")


async def test_a_refused_change_exits_1_with_the_rule_it_breaks(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url, steps=1)
    await vapora(server.url, "status", workflow_id, "cancelled")

    code, _, err = await vapora(server.url, "advance", workflow_id)

    assert code == 1
    assert "cannot advance a cancelled workflow" in err


async def test_an_unreachable_server_exits_1_naming_its_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = await vapora(url, "advance", "whatever")

    message = f"vapora: cannot reach the server at {url}: connection refused\n"
    assert result == (1, "", message)


async def test_a_bad_status_is_a_usage_error() -> None:
    code, _, err = await vapora("http://127.0.0.1:9", "status", "some-id", "done")

    assert code == 2
    assert "invalid choice: 'done'" in err


async def test_a_base_path_in_the_url_is_kept(server_process: Any) -> None:
    server: ServerProcess = server_process("--base-path", "/vapora")
    url = f"{server.url}/vapora/"

    _, out, _ = await vapora(url, "create", "Behind a proxy", "only")
    workflow_id = out.strip()
    await vapora(url, "status", workflow_id, "completed")
    watched = await vapora(url, "watch", workflow_id)

    assert watched == (0, "Behind a proxy: Step 1 of 1 (completed)\n", "")


# -- watch ---------------------------------------------------------------------------


async def test_watch_exits_0_once_the_workflow_completes_while_it_watches(
    server_process: Any, watch: StartWatch
) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url, steps=2)
    advance = f"/api/workflows/{workflow_id}/advance"

    watcher = await watch(server.url, workflow_id)
    assert await watcher.line() == "Deploy: Not started · 2 steps (pending)"
    await api(server.url, "POST", advance, message="Building")
    assert await watcher.line() == "Deploy: Step 1 of 2 (running) — Building"
    await api(server.url, "POST", advance)
    assert await watcher.line() == "Deploy: Step 2 of 2 (running) — Building"
    await api(server.url, "POST", advance, message="Shipped")

    assert await watcher.line() == "Deploy: Step 2 of 2 (completed) — Shipped"
    assert await watcher.exit_code() == 0


@pytest.mark.parametrize(("status", "code"), [("failed", 1), ("cancelled", 3)])
async def test_watch_exits_1_when_it_fails_and_3_when_it_is_cancelled(
    server_process: Any, watch: StartWatch, status: str, code: int
) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url)
    watcher = await watch(server.url, workflow_id)
    await watcher.line()

    await api(server.url, "POST", f"/api/workflows/{workflow_id}/status", status=status)

    assert await watcher.line() == f"Deploy: Step 1 of 3 ({status})"
    assert await watcher.exit_code() == code


async def test_watch_of_an_unknown_workflow_exits_1(server_process: Any) -> None:
    server: ServerProcess = server_process()

    result = await vapora(server.url, "watch", "nosuchflow12")

    assert result == (1, "", "vapora: no workflow with id 'nosuchflow12'\n")


async def test_watch_resumes_after_the_server_restarts_and_exits_0_when_done(
    server_process: Any, watch: StartWatch, tmp_path: Path
) -> None:
    port = free_port()
    db = tmp_path / "restart.db"
    server: ServerProcess = server_process("--port", str(port), db=db)
    workflow_id = await create(server.url)
    advance = f"/api/workflows/{workflow_id}/advance"
    watcher = await watch(server.url, workflow_id)
    assert await watcher.line() == "Deploy: Not started · 3 steps (pending)"
    await api(server.url, "POST", advance)
    assert await watcher.line() == "Deploy: Step 1 of 3 (running)"

    assert await asyncio.to_thread(server.stop) == 0
    assert "reconnecting" in await watcher.error_line()
    again: ServerProcess = server_process("--port", str(port), db=db)
    await api(again.url, "POST", advance, message="while away")

    assert await watcher.line() == "Deploy: Step 2 of 3 (running) — while away"
    assert await watcher.error_line() == "vapora: following again"
    await api(again.url, "POST", advance)
    assert await watcher.line() == "Deploy: Step 3 of 3 (running) — while away"
    await api(again.url, "POST", advance)
    assert await watcher.line() == "Deploy: Step 3 of 3 (completed) — while away"
    assert await watcher.exit_code() == 0


def read_terminal(fd: int) -> str:
    """Everything a child wrote to its terminal, once it has closed it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child's side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_watch_draws_a_progress_panel_on_a_terminal(
    server_process: Any,
) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url)
    await api(server.url, "POST", f"/api/workflows/{workflow_id}/advance")
    await api(server.url, "POST", f"/api/workflows/{workflow_id}/advance")
    await api(
        server.url,
        "POST",
        f"/api/workflows/{workflow_id}/status",
        status="failed",
        message="Tests broke",
    )
    parent, child = pty.openpty()

    proc = subprocess.Popen(
        [sys.executable, "-m", "vapora", "watch", workflow_id],
        stdout=child,
        env=dict(cli_env(server.url), TERM="xterm", COLUMNS="60", LINES="20"),
    )
    os.close(child)
    screen = await asyncio.to_thread(read_terminal, parent)
    os.close(parent)

    assert await asyncio.to_thread(proc.wait, EXIT_TIMEOUT_S) == 1
    assert "[#######-------------] 33%  Step 2 of 3  failed" in screen
    assert "Tests broke" in screen
    assert "✓ step 1" in screen and "✗ step 2" in screen and "· step 3" in screen
    assert "\x1b[J" in screen


async def test_watch_stops_quietly_with_130_on_ctrl_c(
    server_process: Any, watch: StartWatch
) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url)
    watcher = await watch(server.url, workflow_id)
    await watcher.line()

    watcher.proc.send_signal(signal.SIGINT)

    assert await watcher.exit_code() == 130
    assert watcher.proc.stderr is not None
    assert await watcher.proc.stderr.read() == b""


async def test_no_token_says_how_to_give_one(server_process: Any) -> None:
    server: ServerProcess = server_process()
    workflow_id = await create(server.url)

    code, out, err = await vapora(server.url, "advance", workflow_id, token="")

    assert (code, out) == (1, "")
    assert "set VAPORA_TOKEN or pass --token" in err
