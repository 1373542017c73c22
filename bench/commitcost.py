"""What one durable change costs the server's CPU, back to back and at a steady rate.

python -m bench.commitcost

The standard load publishes 100 changes a second, so the server's core idles
for most of the 10 ms between two of them, and every change starts with cold
caches. This measures one store change (the transaction and the rules around
it, as the API runs them) in the thread's CPU time, first back to back, then
one every 10 ms, beside two controls that touch no file: a JSON encoding and
a transaction on an in-memory SQLite database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from vapora.store import Store

Step = Callable[[int], Awaitable[None]]


async def cpu_per_call(step: Step, count: int, pause_s: float) -> float:
    """Median thread CPU microseconds of step, called count times pause_s apart."""
    spent: list[float] = []
    for number in range(count):
        if pause_s:
            await asyncio.sleep(pause_s)
        started = time.thread_time()
        await step(number)
        spent.append(time.thread_time() - started)
    return statistics.median(spent) * 1e6


async def measure(count: int, pause_s: float) -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory(prefix="vapora-commitcost-") as folder:
        store = Store(Path(folder) / "vapora.db")
        await store.open()
        try:
            ids = [
                (await store.create_workflow(f"w{i}", ["build", "test"], "bench")).id
                for i in range(100)
            ]
            message = "x" * 256

            async def change(number: int) -> None:
                await store.set_message(ids[number % 100], f"{number} {message}", "b")

            document = {"steps": [{"name": f"s{i}", "n": i} for i in range(10)]}

            async def encode(number: int) -> None:
                for _ in range(20):
                    json.dumps(document)

            memory = sqlite3.connect(":memory:", isolation_level=None)
            memory.execute("CREATE TABLE t (n INTEGER, text TEXT)")

            async def in_memory(number: int) -> None:
                memory.execute("BEGIN")
                memory.execute("INSERT INTO t VALUES (?, ?)", (number, message))
                memory.execute("COMMIT")

            rows = []
            for name, step in (
                ("store change (SQLite file)", change),
                ("control: 20 JSON encodings", encode),
                ("control: in-memory SQLite insert", in_memory),
            ):
                hot = await cpu_per_call(step, count, 0)
                cold = await cpu_per_call(step, count, pause_s)
                rows.append((name, hot, cold))
            return rows
        finally:
            await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=500, help="calls per figure")
    parser.add_argument("--pause-ms", type=float, default=10.0)
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to; -1: none")
    args = parser.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    rows = asyncio.run(measure(args.count, args.pause_ms / 1000))
    print(f"| what | back to back (µs) | one every {args.pause_ms:g} ms (µs) | ratio |")
    print("|---|---|---|---|")
    for name, hot, cold in rows:
        print(f"| {name} | {hot:.0f} | {cold:.0f} | ×{cold / max(hot, 1e-9):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
