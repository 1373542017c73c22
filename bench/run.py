"""One measured run: N subscribers on W workflows, U changes published at R/s."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clients import HttpConnection, Subscriber, Tally, open_subscriber, stamped_message
from .profiling import Profiler
from .servers import Nodes, Server, machine_busy_s

HOST = "127.0.0.1"
CONNECTS_IN_FLIGHT = 100
PUBLISHERS = 8
CONNECT_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 10.0
SETTLE_S = 1.0
IDLE_S = 2.0
LATE_START_NS = 5_000_000
LAG_TICK_S = 0.005


@dataclass
class Published:
    """What the publisher sent and what the server acknowledged."""

    acked: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    ack_ns: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    late_starts: int = 0
    elapsed_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.ack_ns)


@dataclass
class RunResult:
    """Every figure of one run, in plain units; the report formats them."""

    server: str
    subscribers: int
    workflows: int
    rate: float
    changes: int
    connect_s: float
    connect_failures: int
    rss_before_kib: int
    rss_after_kib: int
    latency_ms: dict[str, float]
    ack_ms: dict[str, float]
    deliveries: int
    expected: int
    deliveries_per_s: float
    lost: int
    duplicated: int
    out_of_order: int
    unexpected: int
    protocol_errors: list[str]
    publish_errors: list[str]
    late_starts: int
    server_cpu_s: float
    server_idle_cpu_pct: float
    gc_max_pause_ms: float | None
    gc_long_pauses: int | None
    gc_max_pause_cpu_ms: float | None
    gc_max_pause_connect_ms: float | None
    # Pauses over 1 ms: (ms after publishing began, pause ms, generation, CPU ms).
    gc_pauses_publishing: list[tuple[float, float, int, float]]
    generator_connect_cpu_pct: float
    generator_publish_cpu_pct: float
    generator_max_lag_ms: float
    other_cpu_pct: float
    heartbeats: int
    pings: int
    other_frames: dict[str, int]
    # (ms after publishing began, ms, what) of server callbacks over 20 ms.
    slow_callbacks_publishing: list[tuple[float, float, str]]
    # (ms after publishing began, latency ms) of the slowest deliveries.
    slowest: list[tuple[float, float]]
    # (ms after publishing began, frames) of each burst of heartbeats.
    heartbeat_bursts: list[tuple[float, int]]
    # With several nodes: how many, and the broker's CPU over the same window
    # (not in server_cpu_s).
    nodes: int = 1
    broker_cpu_s: float = 0.0

    @property
    def mem_per_conn_kb(self) -> float:
        """Server memory per connection in kB (1000 bytes), from VmRSS."""
        grown = (self.rss_after_kib - self.rss_before_kib) * 1024
        return grown / max(1, self.subscribers) / 1000

    @property
    def cpu_us_per_delivery(self) -> float:
        return self.server_cpu_s * 1e6 / max(1, self.deliveries)

    @property
    def generator_bound(self) -> bool:
        """True when the load generator was near 100% of its core."""
        return max(self.generator_connect_cpu_pct, self.generator_publish_cpu_pct) > 90

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["mem_per_conn_kb"] = self.mem_per_conn_kb
        data["cpu_us_per_delivery"] = self.cpu_us_per_delivery
        data["generator_bound"] = self.generator_bound
        return data


def slowest(tally: Tally, start_ns: int, count: int = 50) -> list[tuple[float, float]]:
    """The slowest deliveries, with when they arrived, to see what they line up with."""
    pairs = sorted(zip(tally.latencies_ns, tally.received_ns, strict=True))[-count:]
    return [((at - start_ns) / 1e6, latency / 1e6) for latency, at in pairs]


def bursts(
    times_ns: list[int], start_ns: int, gap_ns: int = 500_000_000
) -> list[tuple[float, int]]:
    """Group arrival times into bursts split by gaps; (start ms, count) of each."""
    out: list[tuple[float, int]] = []
    last = None
    for at in sorted(times_ns):
        if last is None or at - last > gap_ns:
            out.append(((at - start_ns) / 1e6, 0))
        out[-1] = (out[-1][0], out[-1][1] + 1)
        last = at
    return out


def percentiles_ms(values_ns: list[int]) -> dict[str, float]:
    """p50, p90, p99 and max in milliseconds (nearest rank)."""
    if not values_ns:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"),
                "max": float("nan")}  # fmt: skip
    ordered = sorted(values_ns)
    last = len(ordered) - 1

    def rank(q: float) -> float:
        return ordered[min(last, int(q * len(ordered)))] / 1e6

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": rank(1.0)}


class LoopLag:
    """How late this process's event loop wakes up: a sign of its own overload."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            self.max_s = max(self.max_s, loop.time() - expected)

    def start(self) -> None:
        self.max_s = 0.0
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def wait_for_quiet(limit_s: float, busy_pct: float = 25.0) -> float | None:
    """Wait up to limit_s for other processes to use under busy_pct of a core.

    Returns the share of a core they used in the last second, or None if
    limit_s is 0 (no check).
    """
    if limit_s <= 0:
        return None
    deadline = time.monotonic() + limit_s
    while True:
        mine, busy = time.process_time(), machine_busy_s()
        await asyncio.sleep(1)
        others = (machine_busy_s() - busy - (time.process_time() - mine)) * 100
        if others < busy_pct or time.monotonic() >= deadline:
            return others


async def create_workflows(port: int, token: str, count: int) -> list[str]:
    """Create count workflows through the API, a few at a time; return their ids."""
    ids: list[str] = []

    async def create_some(share: range) -> None:
        conn = HttpConnection(HOST, port, token)
        try:
            for number in share:
                body = {"name": f"bench {number}", "steps": ["build", "test", "ship"]}
                status, answer = await conn.post_json("/api/workflows", body)
                if status != 201 or not isinstance(answer, dict):
                    raise RuntimeError(f"creating a workflow answered {status}")
                ids.append(str(answer["workflow_id"]))
        finally:
            conn.close()

    await asyncio.gather(
        *(create_some(range(i, count, PUBLISHERS)) for i in range(PUBLISHERS))
    )
    return ids


def node_port(ports: list[int], number: int, workflows: int) -> int:
    """The port of the node for the number-th subscriber or change.

    Item number is for workflow number mod W; successive items of one workflow
    alternate between the nodes, so every workflow has subscribers and changes on
    each of them.
    """
    return ports[(number // max(1, workflows)) % len(ports)]


async def connect_all(
    ports: list[int], ids: list[str], count: int, tally: Tally
) -> tuple[list[Subscriber], list[str]]:
    """Open count subscribers spread evenly over ids (and over the nodes' ports);
    return them and the failures."""
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    subscribers: list[Subscriber] = []
    failures: list[str] = []

    async def connect(number: int) -> None:
        workflow_id = ids[number % len(ids)]
        port = node_port(ports, number, len(ids))
        async with gate:
            try:
                sub = await open_subscriber(
                    HOST, port, workflow_id, tally, CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as error:
                failures.append(f"{type(error).__name__}: {error}")
            else:
                subscribers.append(sub)

    await asyncio.gather(*(connect(i) for i in range(count)))
    return subscribers, failures


async def publish_steady(
    port: int | list[int],
    token: str,
    ids: list[str],
    count: int,
    rate: float,
    message_bytes: int,
    connections: int = PUBLISHERS,
) -> Published:
    """Publish count messages, round robin over ids, starting one every 1/rate s.

    With several ports (nodes), the connections are shared out between them, and
    successive changes of a workflow go through the nodes in turn.
    """
    ports = port if isinstance(port, list) else [port]
    published = Published()
    pools: dict[int, asyncio.Queue[HttpConnection]] = {}
    for each in ports:
        pools[each] = asyncio.Queue()
        for _ in range(max(1, connections // len(ports))):
            pools[each].put_nowait(HttpConnection(HOST, each, token))

    def body(sent_ns: int) -> bytes:
        return json.dumps({"message": stamped_message(sent_ns, message_bytes)}).encode()

    async def publish(number: int) -> None:
        workflow_id = ids[number % len(ids)]
        pool = pools[node_port(ports, number, len(ids))]
        conn = await pool.get()
        path = f"/api/workflows/{workflow_id}/message"
        try:
            status, answer, sent_ns = await conn.post(path, body)
            acked_ns = time.perf_counter_ns()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
            published.errors.append(f"{type(error).__name__}: {error}")
            return
        finally:
            pool.put_nowait(conn)
        if status != 200:
            published.errors.append(f"{status}: {answer[:200]!r}")
            return
        published.acked[workflow_id].append(int(json.loads(answer)["seq"]))
        published.ack_ns.append(acked_ns - sent_ns)

    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks = []
    for number in range(count):
        delay = started + number / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay * 1e9 > LATE_START_NS:
            published.late_starts += 1
        tasks.append(loop.create_task(publish(number)))
    await asyncio.gather(*tasks)
    published.elapsed_s = loop.time() - started
    for pool in pools.values():
        while not pool.empty():
            pool.get_nowait().close()
    return published


def check_order(
    subscribers: list[Subscriber], acked: dict[str, list[int]]
) -> dict[str, int]:
    """Count lost, duplicated, out-of-order and unexpected updates."""
    counts = {"lost": 0, "duplicated": 0, "out_of_order": 0, "unexpected": 0}
    for sub in subscribers:
        seen: set[int] = set()
        highest = -1
        for seq in sub.seqs:
            if seq in seen:
                counts["duplicated"] += 1
                continue
            if seq < highest:
                counts["out_of_order"] += 1
            seen.add(seq)
            highest = max(highest, seq)
        expected = set(acked.get(sub.workflow_id, ()))
        counts["lost"] += len(expected - seen)
        counts["unexpected"] += len(seen - expected)
    return counts


async def wait_for_deliveries(tally: Tally, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while tally.updates < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


Pause = tuple[float, float, int, float]


def gc_window(
    probe: dict[str, Any] | None, start_ns: int, end_ns: int
) -> list[Pause] | None:
    """Collections over 1 ms that started in a window (times in ms from its start)."""
    if probe is None:
        return None
    return [
        ((start - start_ns) / 1e6, pause / 1e6, generation, cpu / 1e6)
        for start, pause, generation, cpu in probe["long_pauses"]
        if start_ns <= start <= end_ns
    ]


def slow_window(
    probe: dict[str, Any] | None, start_ns: int, end_ns: int
) -> list[tuple[float, float, str]]:
    """Server callbacks over 20 ms that started in a window (ms from its start)."""
    if probe is None:
        return []
    return [
        ((start - start_ns) / 1e6, took / 1e6, what)
        for start, took, what in probe["slow_callbacks"]
        if start_ns <= start <= end_ns
    ]


def longest(pauses: list[Pause] | None, field: int = 1) -> float | None:
    """The longest pause in wall time (field 1) or CPU time (field 3)."""
    return None if pauses is None else max((p[field] for p in pauses), default=0.0)


async def run_size(
    server: Server | Nodes,
    token: str,
    subscribers: int,
    per_workflow: int,
    changes: int,
    rate: float,
    message_bytes: int,
    profile: Path | None = None,
) -> RunResult:
    """Connect, idle, publish and drain against a fresh server; measure it all."""
    port = server.port
    ports = server.ports if isinstance(server, Nodes) else [port]
    broker = server.broker if isinstance(server, Nodes) else None
    profiler = Profiler(profile, server.proc.pid, f"{server.name}-{subscribers}")
    workflows = max(1, subscribers // per_workflow)
    ids = await create_workflows(port, token, workflows)
    await asyncio.sleep(0.5)
    rss_before = server.rss_kib()
    tally = Tally()
    lag = LoopLag()

    profiler.start("connect")
    connect_ns = time.perf_counter_ns()
    cpu_before_connect = time.process_time()
    subs, failures = await connect_all(ports, ids, subscribers, tally)
    profiler.stop()
    connect_s = (time.perf_counter_ns() - connect_ns) / 1e9
    generator_connect_cpu = time.process_time() - cpu_before_connect
    connected_ns = time.perf_counter_ns()

    await asyncio.sleep(SETTLE_S)
    rss_after = server.rss_kib()
    idle_cpu = server.cpu_s()
    await asyncio.sleep(IDLE_S)
    idle_pct = (server.cpu_s() - idle_cpu) * 100 / IDLE_S

    # The generator holds many objects: its own collections would add to the
    # latencies it measures, so none run while it publishes.
    gc.collect()
    gc.disable()
    profiler.start("publish")
    lag.start()
    try:
        publish_ns = time.perf_counter_ns()
        server_cpu = server.cpu_s()
        broker_cpu = broker.cpu_s() if broker else 0.0
        generator_cpu = time.process_time()
        machine_busy = machine_busy_s()
        published = await publish_steady(
            ports, token, ids, changes, rate, message_bytes
        )
        expected = sum(len(published.acked.get(s.workflow_id, ())) for s in subs)
        await wait_for_deliveries(tally, expected, DRAIN_TIMEOUT_S)
        end_ns = time.perf_counter_ns()
        server_cpu = server.cpu_s() - server_cpu
        broker_cpu = (broker.cpu_s() if broker else 0.0) - broker_cpu
        generator_cpu = time.process_time() - generator_cpu
        machine_busy = machine_busy_s() - machine_busy
    finally:
        lag.stop()
        profiler.stop()
        gc.enable()
    window_s = (end_ns - publish_ns) / 1e9

    probe = await asyncio.to_thread(server.gc_pauses, end_ns)
    gc_publishing = gc_window(probe, publish_ns, end_ns)
    gc_connecting = gc_window(probe, connect_ns, connected_ns)
    order = check_order(subs, published.acked)
    for sub in subs:
        sub.close()
    await asyncio.sleep(0.5)

    return RunResult(
        server=server.name,
        subscribers=subscribers,
        workflows=workflows,
        rate=rate,
        changes=published.count,
        connect_s=connect_s,
        connect_failures=len(failures),
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        latency_ms=percentiles_ms(tally.latencies_ns),
        ack_ms=percentiles_ms(published.ack_ns),
        deliveries=tally.updates,
        expected=expected,
        deliveries_per_s=tally.updates / window_s,
        lost=order["lost"],
        duplicated=order["duplicated"],
        out_of_order=order["out_of_order"],
        unexpected=order["unexpected"],
        protocol_errors=tally.protocol_errors[:20],
        publish_errors=published.errors[:20] + failures[:20],
        late_starts=published.late_starts,
        server_cpu_s=server_cpu,
        server_idle_cpu_pct=idle_pct,
        gc_max_pause_ms=longest(gc_publishing),
        gc_max_pause_cpu_ms=longest(gc_publishing, 3),
        gc_long_pauses=None if gc_publishing is None else len(gc_publishing),
        gc_max_pause_connect_ms=longest(gc_connecting),
        gc_pauses_publishing=gc_publishing or [],
        generator_connect_cpu_pct=generator_connect_cpu * 100 / max(connect_s, 1e-9),
        generator_publish_cpu_pct=generator_cpu * 100 / window_s,
        generator_max_lag_ms=lag.max_s * 1000,
        other_cpu_pct=(machine_busy - server_cpu - broker_cpu - generator_cpu)
        * 100
        / window_s,
        heartbeats=tally.heartbeats,
        pings=tally.pings,
        other_frames=dict(tally.other_frames),
        slow_callbacks_publishing=slow_window(probe, publish_ns, end_ns),
        slowest=slowest(tally, publish_ns),
        heartbeat_bursts=bursts(tally.heartbeats_ns, publish_ns),
        nodes=len(ports),
        broker_cpu_s=broker_cpu,
    )


@dataclass
class DurableResult:
    """Acknowledged changes: at a steady rate, and back to back on one connection."""

    server: str
    rate: float
    steady_changes: int
    steady_ack_ms: dict[str, float]
    steady_errors: int
    back_to_back_changes: int
    back_to_back_s: float
    back_to_back_ack_ms: dict[str, float]
    server_cpu_us_per_change: float

    @property
    def back_to_back_per_s(self) -> float:
        return self.back_to_back_changes / max(self.back_to_back_s, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, back_to_back_per_s=self.back_to_back_per_s)


async def run_durable(
    server: Server,
    token: str,
    rate: float,
    steady_s: float,
    back_to_back_s: float,
    message_bytes: int,
    max_back_to_back: int = 200_000,
) -> DurableResult:
    """Measure acknowledgements with no subscribers: steady, then back to back."""
    ids = await create_workflows(server.port, token, 10)
    steady = await publish_steady(
        server.port, token, ids, max(1, int(rate * steady_s)), rate, message_bytes
    )

    conn = HttpConnection(HOST, server.port, token)
    path = f"/api/workflows/{ids[0]}/message"
    message = json.dumps({"message": "x" * message_bytes}).encode()
    ack_ns: list[int] = []
    cpu = server.cpu_s()
    started = time.perf_counter()
    deadline = started + back_to_back_s
    try:
        while time.perf_counter() < deadline and len(ack_ns) < max_back_to_back:
            status, answer, sent_ns = await conn.post(path, lambda _: message)
            if status != 200:
                raise RuntimeError(f"a back-to-back publish answered {status}")
            ack_ns.append(time.perf_counter_ns() - sent_ns)
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    cpu = server.cpu_s() - cpu

    return DurableResult(
        server=server.name,
        rate=rate,
        steady_changes=steady.count,
        steady_ack_ms=percentiles_ms(steady.ack_ns),
        steady_errors=len(steady.errors),
        back_to_back_changes=len(ack_ns),
        back_to_back_s=elapsed,
        back_to_back_ack_ms=percentiles_ms(ack_ns),
        server_cpu_us_per_change=cpu * 1e6 / max(1, len(ack_ns)),
    )
