"""Acknowledged changes survive SIGKILL; a backup taken under load is consistent."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import AUTH, ServerProcess


async def post_until_stopped(
    session: aiohttp.ClientSession, url: str, wid: str, stop: asyncio.Event
) -> list[tuple[int, str]]:
    """Post messages until stopped or the server dies; return the acknowledged."""
    acknowledged: list[tuple[int, str]] = []
    i = 0
    while not stop.is_set():
        message = f"change {i}"
        try:
            async with session.post(
                f"{url}/api/workflows/{wid}/message",
                json={"message": message},
                headers=AUTH,
            ) as response:
                if response.status != 200:
                    break
                acknowledged.append(((await response.json())["seq"], message))
        except aiohttp.ClientError:
            break
        i += 1
    return acknowledged


async def create(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(
        f"{url}/api/workflows", json={"name": "durable", "steps": ["a"]}, headers=AUTH
    ) as response:
        return str((await response.json())["workflow_id"])


async def test_sigkill_loses_no_acknowledged_change(server_process: Any) -> None:
    server: ServerProcess = server_process()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        wid = await create(session, server.url)
        writers = [
            asyncio.create_task(post_until_stopped(session, server.url, wid, stop))
            for _ in range(4)
        ]
        # Kill it in the middle of the writes, once a good number have landed.
        while not await _has_seq(session, server.url, wid, 200):
            pass
        server.proc.send_signal(signal.SIGKILL)
        acknowledged = [a for w in await asyncio.gather(*writers) for a in w]
    await asyncio.to_thread(server.proc.wait, 10)

    conn = sqlite3.connect(server.db)
    stored = dict(
        conn.execute("SELECT seq, payload FROM events WHERE workflow_id = ?", (wid,))
    )
    (row_seq,) = conn.execute(
        "SELECT seq FROM workflows WHERE id = ?", (wid,)
    ).fetchone()

    assert len(acknowledged) >= 150
    for seq, message in acknowledged:
        assert json.loads(stored[seq])["message"] == message
    assert row_seq == max(stored)
    assert sorted(stored) == list(range(1, row_seq + 1))


async def _has_seq(
    session: aiohttp.ClientSession, url: str, wid: str, seq: int
) -> bool:
    async with session.get(f"{url}/api/workflows/{wid}") as response:
        return bool((await response.json())["seq"] >= seq)


async def test_backup_under_load_opens_and_is_consistent(
    server_process: Any, tmp_path: Path
) -> None:
    server: ServerProcess = server_process()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        wids = [await create(session, server.url) for _ in range(3)]
        writers = [
            asyncio.create_task(post_until_stopped(session, server.url, wid, stop))
            for wid in wids
        ]
        while not await _has_seq(session, server.url, wids[0], 50):
            pass

        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "vapora",
                "backup",
                str(tmp_path / "copy.db"),
                "--db",
                str(server.db),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        stop.set()
        await asyncio.gather(*writers)

    assert result.returncode == 0, result.stderr
    assert "3 workflows" in result.stderr
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for wid, seq, message in copy.execute("SELECT id, seq, message FROM workflows"):
        seqs = [
            s
            for (s,) in copy.execute(
                "SELECT seq FROM events WHERE workflow_id = ? ORDER BY seq", (wid,)
            )
        ]
        assert seqs == list(range(1, seq + 1))
        (last,) = copy.execute(
            "SELECT payload FROM events WHERE workflow_id = ? AND seq = ?", (wid, seq)
        ).fetchone()
        assert json.loads(last)["message"] == message
    live = sqlite3.connect(server.db)
    for wid, seq in copy.execute("SELECT id, seq FROM workflows"):
        (later,) = live.execute(
            "SELECT seq FROM workflows WHERE id = ?", (wid,)
        ).fetchone()
        assert later >= seq
