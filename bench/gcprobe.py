"""A server's pauses, written where the benchmark reads them.

`python -m bench.gcprobe serve ...` runs the `vapora` command line unchanged, after
installing a `gc.callbacks` hook that times every collection, and a wrapper that
times every event-loop callback. Twice a second (and at exit) a thread writes a
summary as JSON to the file named by BENCH_GC_FILE, and appends beside it the
collections over a millisecond and the callbacks over SLOW_CALLBACK_NS, with what
they ran. Times are `time.perf_counter_ns()`, which on Linux is CLOCK_MONOTONIC,
the same clock in every process, so the benchmark can pick what happened in its own
time window. Each collection is also measured in the thread's CPU time, which a
busy machine does not stretch.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import resource
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

GC_FILE_VARIABLE = "BENCH_GC_FILE"
# Pauses at least this long are kept one by one, with their start time.
LONG_PAUSE_NS = 1_000_000
SLOW_CALLBACK_NS = 20_000_000
WRITE_INTERVAL_S = 0.5


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


class GcPauses:
    """Counts, totals and maxima of collections per generation, and the long ones."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.total_ns = [0, 0, 0]
        self.max_ns = [0, 0, 0]
        # (start, pause, generation, CPU time) of each pause over LONG_PAUSE_NS,
        # until the writer takes them.
        self.long_pauses: deque[tuple[int, int, int, int]] = deque(maxlen=100_000)
        self._started_ns = 0
        self._started_cpu_ns = 0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        """Time one collection; gc calls this at its start and at its stop."""
        now = time.perf_counter_ns()
        if phase == "start":
            self._started_ns = now
            self._started_cpu_ns = time.thread_time_ns()
            return
        generation = int(info["generation"])
        pause = now - self._started_ns
        self.collections[generation] += 1
        self.total_ns[generation] += pause
        self.max_ns[generation] = max(self.max_ns[generation], pause)
        if pause >= LONG_PAUSE_NS:
            cpu = time.thread_time_ns() - self._started_cpu_ns
            self.long_pauses.append((self._started_ns, pause, generation, cpu))

    def summary(self) -> dict[str, Any]:
        return {
            "written_ns": time.perf_counter_ns(),
            "collections": list(self.collections),
            "total_ns": list(self.total_ns),
            "max_ns": list(self.max_ns),
        }


class SlowCallbacks:
    """Event-loop callbacks that ran long: (start, duration, what it ran)."""

    def __init__(self) -> None:
        self.slow: deque[tuple[int, int, str]] = deque(maxlen=10_000)

    def install(self) -> None:
        """Wrap asyncio's Handle._run, which runs every callback and task step."""
        run = asyncio.events.Handle._run
        slow = self.slow

        def timed_run(handle: asyncio.Handle) -> None:
            started = time.perf_counter_ns()
            run(handle)
            took = time.perf_counter_ns() - started
            if took >= SLOW_CALLBACK_NS:
                slow.append((started, took, describe(handle)))

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]


def describe(handle: asyncio.Handle) -> str:
    """Name what a handle ran: a task's coroutine, or the callback."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return "task " + str(getattr(coro, "__qualname__", coro))
    return str(getattr(callback, "__qualname__", callback))[:200]


class Writer:
    """Writes the summary as JSON beside a growing file of long pauses, a line each.

    Only new pauses are written each time, so the probe costs the server next
    to nothing however long it runs.
    """

    def __init__(self, path: Path, pauses: GcPauses, slow: SlowCallbacks) -> None:
        self.path = path
        self.pauses = pauses
        self.slow = slow
        self.lines = pauses_path(path).open("a")
        self.slow_lines = slow_path(path).open("a")

    def write(self) -> None:
        summary = self.pauses.summary()
        long_pauses = self.pauses.long_pauses
        while long_pauses:
            self.lines.write(" ".join(map(str, long_pauses.popleft())) + "\n")
        self.lines.flush()
        while self.slow.slow:
            self.slow_lines.write(json.dumps(self.slow.slow.popleft()) + "\n")
        self.slow_lines.flush()
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(summary))
        os.replace(partial, self.path)

    def write_forever(self) -> None:
        while True:
            time.sleep(WRITE_INTERVAL_S)
            self.write()


def pauses_path(path: Path) -> Path:
    return path.with_suffix(".pauses")


def slow_path(path: Path) -> Path:
    return path.with_suffix(".slow")


def install(path: Path) -> GcPauses:
    """Start timing collections and callbacks, and writing them beside path."""
    pauses = GcPauses()
    slow = SlowCallbacks()
    writer = Writer(path, pauses, slow)
    gc.callbacks.append(pauses.callback)
    slow.install()
    threading.Thread(target=writer.write_forever, name="gc-probe", daemon=True).start()
    atexit.register(writer.write)
    return pauses


def read_pauses(path: Path) -> dict[str, Any] | None:
    """Return what the probe last wrote, with its long pauses, or None if nothing."""
    try:
        data = dict(json.loads(path.read_text()))
        # The last piece is empty, or a line still being written.
        lines = pauses_path(path).read_text().split("\n")[:-1]
        slow_lines = slow_path(path).read_text().split("\n")[:-1]
    except (OSError, ValueError):
        return None
    data["long_pauses"] = [tuple(int(n) for n in line.split()) for line in lines]
    data["slow_callbacks"] = [tuple(json.loads(line)) for line in slow_lines]
    return data


def main() -> int:
    """Run `vapora` with its arguments, timing its collections."""
    raise_open_file_limit()
    target = os.environ.get(GC_FILE_VARIABLE)
    if target:
        install(Path(target))
    from vapora.cli import main as vapora_main

    return vapora_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
