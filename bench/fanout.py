"""The yardstick: an aiohttp server that only fans messages out to sockets.

It speaks the shape of Vapora's API that the benchmark uses, and nothing more: no
store, no tokens, no checks. `POST /api/workflows/{id}/message` raises the id's seq
and sends `{"type": "update", "workflow_id", "seq", "message"}` to every socket
open on `GET /api/workflows/{id}/updates`, with `ws.send_str` as an aiohttp
application would; a new socket first gets a `snapshot` and a `ready` frame.
Sockets are pinged as often as Vapora pings its own, so the two differ only in
what Vapora adds.

    python -m bench.fanout --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path

from aiohttp import web

from .gcprobe import GC_FILE_VARIABLE, install, raise_open_file_limit

GROUPS = web.AppKey("groups", dict[str, set[web.WebSocketResponse]])
SEQS = web.AppKey("seqs", dict[str, int])
HEARTBEAT_S = web.AppKey("heartbeat_s", float)


async def create_workflow(request: web.Request) -> web.Response:
    """Hand out a new id; there is nothing to store."""
    workflow_id = secrets.token_urlsafe(9)
    request.app[SEQS][workflow_id] = 1
    return web.json_response({"workflow_id": workflow_id, "seq": 1}, status=201)


async def post_message(request: web.Request) -> web.Response:
    """Send the body's message to every socket of the id, with the next seq."""
    workflow_id = request.match_info["workflow_id"]
    body = await request.json()
    seqs = request.app[SEQS]
    seq = seqs.get(workflow_id, 0) + 1
    seqs[workflow_id] = seq
    text = json.dumps(
        {
            "type": "update",
            "workflow_id": workflow_id,
            "seq": seq,
            "message": body["message"],
        },
        separators=(",", ":"),
    )
    for ws in tuple(request.app[GROUPS].get(workflow_id, ())):
        try:
            await ws.send_str(text)
        except ConnectionError:
            pass
    return web.json_response({"workflow_id": workflow_id, "seq": seq})


async def updates(request: web.Request) -> web.WebSocketResponse:
    """Send a snapshot and a ready frame, then every update of the id."""
    workflow_id = request.match_info["workflow_id"]
    ws = web.WebSocketResponse(heartbeat=request.app[HEARTBEAT_S], compress=False)
    await ws.prepare(request)
    seq = request.app[SEQS].get(workflow_id, 0)
    head = {"workflow_id": workflow_id, "seq": seq}
    await ws.send_str(json.dumps({"type": "snapshot", **head}))
    await ws.send_str(json.dumps({"type": "ready", **head}))

    group = request.app[GROUPS].setdefault(workflow_id, set())
    group.add(ws)
    try:
        async for _ in ws:
            pass
    finally:
        group.discard(ws)
    return ws


def create_app(heartbeat_s: float) -> web.Application:
    app = web.Application()
    app[GROUPS] = {}
    app[SEQS] = {}
    app[HEARTBEAT_S] = heartbeat_s
    app.router.add_post("/api/workflows", create_workflow)
    app.router.add_post("/api/workflows/{workflow_id}/message", post_message)
    app.router.add_get("/api/workflows/{workflow_id}/updates", updates)
    return app


async def serve(host: str, port: int, heartbeat_s: float) -> None:
    """Serve until SIGINT or SIGTERM; print the URL once listening."""
    runner = web.AppRunner(create_app(heartbeat_s), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"fanout serving http://{bound_host}:{bound_port}/", file=sys.stderr)
    sys.stderr.flush()
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--heartbeat-s", type=float, default=20.0, help="ping interval, as Vapora's"
    )
    args = parser.parse_args()
    raise_open_file_limit()
    target = os.environ.get(GC_FILE_VARIABLE)
    if target:
        install(Path(target))
    asyncio.run(serve(args.host, args.port, args.heartbeat_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
