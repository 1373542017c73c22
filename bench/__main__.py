"""Run the benchmark: each size against a fresh Vapora and a fresh fan-out server.

python -m bench                      # the standard sizes, into bench/RESULTS.md
python -m bench --sizes 300 --changes 200 --output /tmp/r.md --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .gcprobe import raise_open_file_limit
from .report import machine, render
from .run import DurableResult, RunResult, run_durable, run_size, wait_for_quiet
from .servers import Server, start_fanout, start_vapora, start_vapora_nodes

BENCH_DIR = Path(__file__).resolve().parent
STANDARD_SIZES = (1000, 5000, 10000, 19500)
ADMIN_TOKEN = "bench-admin-token"
SERVER_CPU, GENERATOR_CPU = 0, 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, STANDARD_SIZES)),
        help="comma-separated subscriber counts N, each run on a fresh server",
    )
    parser.add_argument(
        "--per-workflow", type=int, default=10, help="subscribers per workflow (N/W)"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="changes per second")
    parser.add_argument(
        "--changes", type=int, default=2000, help="changes U published in each run"
    )
    parser.add_argument("--message-bytes", type=int, default=256)
    parser.add_argument(
        "--durable-s",
        type=float,
        default=10.0,
        help="seconds of steady publishing with no subscribers; 0 skips the "
        "durable-publish measurement",
    )
    parser.add_argument(
        "--back-to-back-s", type=float, default=5.0, help="seconds of back-to-back"
    )
    parser.add_argument(
        "--servers", default="vapora,fanout", help="which servers to measure"
    )
    parser.add_argument(
        "--nodes",
        type=int,
        choices=(1, 2),
        default=1,
        help="2 also runs each size against two Vapora processes on one SQLite "
        "file, joined by a throwaway redis-server",
    )
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=20.0,
        help="before each run, wait up to this long for other processes to calm "
        "down; 0 does not check",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the processes to cores"
    )
    parser.add_argument("--output", default=str(BENCH_DIR / "RESULTS.md"))
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample each server with py-spy while connecting and publishing, "
        "into this folder",
    )
    return parser.parse_args(argv)


def pin_cores(no_pin: bool) -> tuple[int | None, bool]:
    """Pin this process to the generator's core; return the server's core."""
    if no_pin or not hasattr(os, "sched_setaffinity"):
        return None, False
    cores = os.sched_getaffinity(0)
    if not {SERVER_CPU, GENERATOR_CPU} <= cores:
        print("fewer than 2 cores available: not pinning", file=sys.stderr)
        return None, False
    os.sched_setaffinity(0, {GENERATOR_CPU})
    return SERVER_CPU, True


def node_cpus(pinned: bool, count: int) -> list[int | None]:
    """The core of each node: one each when pinning, none otherwise."""
    cores: list[int | None] = [SERVER_CPU, GENERATOR_CPU]
    return cores[:count] if pinned else [None] * count


class Unpinned:
    """While a multi-node run lasts, let the generator run on any core."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned

    def __enter__(self) -> None:
        if self.pinned:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))

    def __exit__(self, *exc: object) -> None:
        if self.pinned:
            os.sched_setaffinity(0, {GENERATOR_CPU})


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def describe(result: RunResult) -> str:
    lat = result.latency_ms
    return (
        f"  {result.server:6} N={result.subscribers:<6} connect "
        f"{result.connect_s:5.1f} s  mem {result.mem_per_conn_kb:5.1f} kB/conn  "
        f"p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f} ms  "
        f"{result.deliveries}/{result.expected} delivered  lost {result.lost} dup "
        f"{result.duplicated} ooo {result.out_of_order}  cpu "
        f"{result.cpu_us_per_delivery:.0f} us/delivery  gc max "
        f"{result.gc_max_pause_ms} ms  generator "
        f"{result.generator_publish_cpu_pct:.0f}%  "
        f"others {max(0, result.other_cpu_pct):.0f}%"
    )


def start_server(
    name: str, folder: Path, cpu: int | None, max_connections: int
) -> Server:
    """Start the named server (vapora or fanout) for one measurement."""
    if name == "vapora":
        return start_vapora(folder, ADMIN_TOKEN, cpu, max_connections)
    return start_fanout(folder, cpu)


async def measure(args: argparse.Namespace, server_cpu: int | None) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    names = [s for s in args.servers.split(",") if s]
    runs: list[RunResult] = []
    durables: list[DurableResult] = []

    async def load(server: Any, size: int) -> RunResult:
        """Put the standard load of this size on a started server."""
        return await run_size(
            server,
            ADMIN_TOKEN,
            size,
            args.per_workflow,
            args.changes,
            args.rate,
            args.message_bytes,
            args.profile,
        )

    with tempfile.TemporaryDirectory(prefix="vapora-bench-") as scratch:
        for size in sizes:
            for name in names:
                folder = Path(scratch) / f"{name}-{size}"
                others = await wait_for_quiet(args.quiet_wait_s)
                if others is not None and others >= 25:
                    say(f"  other processes still use {others:.0f}% of a core")
                server = start_server(name, folder, server_cpu, size + 1000)
                try:
                    result = await load(server, size)
                finally:
                    server.stop()
                runs.append(result)
                say(describe(result))
            if args.nodes > 1:
                await wait_for_quiet(args.quiet_wait_s)
                pinned = server_cpu is not None
                with Unpinned(pinned):
                    cluster = start_vapora_nodes(
                        Path(scratch) / f"vapora-{args.nodes}nodes-{size}",
                        ADMIN_TOKEN,
                        node_cpus(pinned, args.nodes),
                        size + 1000,
                    )
                    try:
                        result = await load(cluster, size)
                    finally:
                        cluster.stop()
                runs.append(result)
                say(describe(result))
        for name in names if args.durable_s > 0 else []:
            await wait_for_quiet(args.quiet_wait_s)
            folder = Path(scratch) / f"{name}-durable"
            server = start_server(name, folder, server_cpu, 64)
            try:
                durable = await run_durable(
                    server,
                    ADMIN_TOKEN,
                    args.rate,
                    args.durable_s,
                    args.back_to_back_s,
                    args.message_bytes,
                )
            finally:
                server.stop()
            durables.append(durable)
            say(
                f"  {name} durable: p99 ack {durable.steady_ack_ms['p99']:.2f} ms at "
                f"{args.rate:g}/s; back to back {durable.back_to_back_per_s:.0f}/s"
            )
    return {"runs": runs, "durables": durables}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    raise_open_file_limit()
    server_cpu, pinned = pin_cores(args.no_pin)
    started = time.monotonic()

    measured = asyncio.run(measure(args, server_cpu))

    elapsed = time.monotonic() - started
    about = machine(pinned, elapsed)
    text = render(measured["runs"], measured["durables"], command, about)
    Path(args.output).write_text(text)
    say(f"wrote {args.output} in {elapsed:.0f} s")
    if args.json:
        data = {
            "command": command,
            "machine": about,
            "runs": [r.as_dict() for r in measured["runs"]],
            "durables": [d.as_dict() for d in measured["durables"]],
        }
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
