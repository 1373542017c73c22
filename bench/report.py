"""The markdown report: the machine, the figures, and the targets met or not."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .run import DurableResult, RunResult

TARGET_SUBSCRIBERS = 19_500
TARGET_P99_MS = 10.0
TARGET_MEM_KB = 15.0
TARGET_GC_MS = 50.0
TARGET_ACK_P99_MS = 5.0
TARGET_BACK_TO_BACK = 2000.0


def machine(pinned: bool, elapsed_s: float) -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "vapora": _version("vapora"),
        "revision": _revision(),
        "pinned": pinned,
        "elapsed_s": round(elapsed_s),
    }


def _revision() -> str:
    """The repository's commit, marked -dirty when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base or math.isnan(value + base):
        return ""
    return f" (×{value / base:.2f})"


def with_ratio(value: float | None, base: float | None, digits: int = 2) -> str:
    return num(value, digits) + ratio(value, base)


HEADER = (
    "| N | W | connect all (s) | memory per connection (kB) | p50 (ms) | p90 (ms) "
    "| p99 (ms) | max (ms) | deliveries/s | lost / dup / out of order "
    "| server CPU per delivery (µs) | server idle CPU (%) | longest GC pause "
    "publishing (ms; CPU ms) | ack p99 (ms) | generator CPU (%) |\n"
    "|" + "---|" * 15
)


def row(run: RunResult, base: RunResult | None) -> str:
    b = base
    lat, blat = run.latency_ms, (b.latency_ms if b else {})
    marks = " †" if run.generator_bound else ""
    integrity = f"{run.lost} / {run.duplicated} / {run.out_of_order}"
    if run.connect_failures or run.unexpected or run.protocol_errors:
        integrity += (
            f" ({run.connect_failures} failed connects, {run.unexpected} unexpected, "
            f"{len(run.protocol_errors)} protocol errors)"
        )
    cells = [
        f"{run.subscribers:,}",
        f"{run.workflows:,}",
        with_ratio(run.connect_s, b.connect_s if b else None, 1),
        with_ratio(run.mem_per_conn_kb, b.mem_per_conn_kb if b else None, 1),
        *(with_ratio(lat[k], blat.get(k)) for k in ("p50", "p90", "p99", "max")),
        with_ratio(run.deliveries_per_s, b.deliveries_per_s if b else None, 0),
        integrity,
        with_ratio(run.cpu_us_per_delivery, b.cpu_us_per_delivery if b else None, 0),
        num(run.server_idle_cpu_pct, 1),
        with_ratio(run.gc_max_pause_ms, b.gc_max_pause_ms if b else None, 1)
        + f"; {num(run.gc_max_pause_cpu_ms, 1)}",
        num(run.ack_ms["p99"]),
        f"{run.generator_connect_cpu_pct:.0f} connecting, "
        f"{run.generator_publish_cpu_pct:.0f} publishing{marks}",
    ]
    return "| " + " | ".join(cells) + " |"


@dataclass
class Verdict:
    target: str
    measured: str
    met: bool | None
    gap: str

    def line(self) -> str:
        state = {True: "met", False: "**not met**", None: "not measured"}[self.met]
        return f"| {self.target} | {self.measured} | {state} | {self.gap} |"


def verdicts(runs: list[RunResult], durables: list[DurableResult]) -> list[Verdict]:
    """Judge each of the project's targets from what was measured."""
    durable = next((d for d in durables if d.server == "vapora"), None)
    vapora = [r for r in runs if r.server == "vapora"]
    fanout = {r.subscribers: r for r in runs if r.server == "fanout"}
    largest = max(vapora, key=lambda r: r.subscribers, default=None)
    at_scale = (
        largest if largest and largest.subscribers >= TARGET_SUBSCRIBERS else None
    )
    out: list[Verdict] = []

    name = f"{TARGET_SUBSCRIBERS:,} subscribers, p99 < {TARGET_P99_MS:g} ms, none lost"
    if at_scale is None:
        out.append(Verdict(name, "no run that large", None, ""))
    else:
        p99 = at_scale.latency_ms["p99"]
        clean = not (
            at_scale.lost
            or at_scale.duplicated
            or at_scale.out_of_order
            or at_scale.connect_failures
        )
        out.append(
            Verdict(
                name,
                f"p99 {num(p99)} ms, lost {at_scale.lost}, "
                f"{at_scale.connect_failures} failed connects",
                p99 < TARGET_P99_MS and clean,
                gap_above(p99, TARGET_P99_MS, "ms"),
            )
        )

    pairs = [(r, fanout[r.subscribers]) for r in vapora if r.subscribers in fanout]
    name = "server CPU per delivery ≤ the minimal fan-out's"
    if not pairs:
        out.append(Verdict(name, "no fan-out run", None, ""))
    else:
        worst = max(pairs, key=lambda p: p[0].cpu_us_per_delivery / max(
            p[1].cpu_us_per_delivery, 1e-9))  # fmt: skip
        factor = worst[0].cpu_us_per_delivery / max(worst[1].cpu_us_per_delivery, 1e-9)
        each = "; ".join(
            f"×{v.cpu_us_per_delivery / max(f.cpu_us_per_delivery, 1e-9):.2f} "
            f"at {v.subscribers:,}"
            for v, f in pairs
        )
        out.append(
            Verdict(
                name,
                "worst at N = "
                f"{worst[0].subscribers:,}: {num(worst[0].cpu_us_per_delivery, 0)} "
                f"vs {num(worst[1].cpu_us_per_delivery, 0)} µs ({each})",
                factor <= 1.0,
                ""
                if factor <= 1
                else f"{(factor - 1) * 100:.0f}% more CPU at worst; why: "
                "bench/README.md, “CPU per delivery”",
            )
        )

    name = f"≤ {TARGET_MEM_KB:g} kB server memory per idle connection"
    if largest is None:
        out.append(Verdict(name, "no Vapora run", None, ""))
    else:
        mem = largest.mem_per_conn_kb
        out.append(
            Verdict(
                name,
                f"{num(mem, 1)} kB at N = {largest.subscribers:,}",
                mem <= TARGET_MEM_KB,
                gap_above(mem, TARGET_MEM_KB, "kB"),
            )
        )

    name = f"no GC pause > {TARGET_GC_MS:g} ms publishing at {TARGET_SUBSCRIBERS:,}"
    if at_scale is None or at_scale.gc_max_pause_ms is None:
        out.append(Verdict(name, "not recorded", None, ""))
    else:
        pause = at_scale.gc_max_pause_ms
        out.append(
            Verdict(
                name,
                f"longest {num(pause, 1)} ms ({num(at_scale.gc_max_pause_cpu_ms, 1)} "
                "ms of CPU)",
                pause <= TARGET_GC_MS,
                gap_above(pause, TARGET_GC_MS, "ms"),
            )
        )

    name = f"acknowledges 100 changes/s with p99 < {TARGET_ACK_P99_MS:g} ms"
    name_b2b = f"one client back to back ≥ {TARGET_BACK_TO_BACK:,.0f} changes/s"
    if durable is None:
        out.append(Verdict(name, "skipped", None, ""))
        out.append(Verdict(name_b2b, "skipped", None, ""))
    else:
        p99 = durable.steady_ack_ms["p99"]
        out.append(
            Verdict(
                name,
                f"p99 {num(p99)} ms at {durable.rate:g}/s",
                p99 < TARGET_ACK_P99_MS and not durable.steady_errors,
                gap_above(p99, TARGET_ACK_P99_MS, "ms"),
            )
        )
        rate = durable.back_to_back_per_s
        out.append(
            Verdict(
                name_b2b,
                f"{rate:,.0f} changes/s",
                rate >= TARGET_BACK_TO_BACK,
                ""
                if rate >= TARGET_BACK_TO_BACK
                else f"{TARGET_BACK_TO_BACK - rate:,.0f}/s short "
                f"(×{TARGET_BACK_TO_BACK / rate:.2f} needed)",
            )
        )
    return out


def gap_above(value: float, limit: float, unit: str) -> str:
    if math.isnan(value) or value <= limit:
        return ""
    return f"{value - limit:,.1f} {unit} over (×{value / limit:.2f})"


def render(
    runs: list[RunResult],
    durables: list[DurableResult],
    command: str,
    about: dict[str, Any],
) -> str:
    """Return the whole RESULTS.md text."""
    fanout = {r.subscribers: r for r in runs if r.server == "fanout"}
    vapora = [r for r in runs if r.server == "vapora"]
    single = {r.subscribers: r for r in vapora}
    several = [r for r in runs if r.nodes > 1]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{command}` on {about['date']}, in {about['elapsed_s']} s.",
        "",
        f"Machine: {about['nproc']} cores ({about['cpu']}), Linux {about['kernel']}, "
        f"Python {about['python']}, aiohttp {about['aiohttp']}, Vapora "
        f"{about['vapora']} at commit {about['revision']}. "
        + (
            "Server pinned to core 0, load generator to core 1."
            if about["pinned"]
            else "Processes not pinned to cores."
        ),
        "",
    ]
    if vapora:
        lines += [
            "## Vapora",
            "",
            "In brackets: the ratio to the minimal fan-out server "
            "(`bench/fanout.py`) under the same load; below 1 is better for every "
            "column but deliveries/s.",
            "",
            HEADER,
            *(row(r, fanout.get(r.subscribers)) for r in vapora),
            "",
        ]
    if several:
        lines += two_nodes(several, single, about["pinned"])
    if fanout:
        lines += [
            "## The minimal fan-out",
            "",
            HEADER,
            *(row(r, None) for r in fanout.values()),
            "",
        ]
    if durables:
        lines += [
            "## Durable publishes (no subscribers)",
            "",
            "Vapora commits each change before answering; the fan-out stores "
            "nothing and is shown for scale.",
            "",
            "| server | measurement | changes | ack p50 (ms) | ack p99 (ms) "
            "| ack max (ms) | acknowledged/s | server CPU per change (µs) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for durable in durables:
            steady, b2b = durable.steady_ack_ms, durable.back_to_back_ack_ms
            lines += [
                f"| {durable.server} | steady, {durable.rate:g}/s on 8 connections | "
                f"{durable.steady_changes:,} | {num(steady['p50'])} | "
                f"{num(steady['p99'])} | {num(steady['max'])} | {durable.rate:g} | |",
                f"| {durable.server} | one client, back to back | "
                f"{durable.back_to_back_changes:,} | {num(b2b['p50'])} | "
                f"{num(b2b['p99'])} | {num(b2b['max'])} | "
                f"{durable.back_to_back_per_s:,.0f} | "
                f"{num(durable.server_cpu_us_per_change, 0)} |",
            ]
        lines.append("")
    lines += [
        "## Targets",
        "",
        "| target | measured | verdict | gap |",
        "|---|---|---|---|",
        *(v.line() for v in verdicts(runs, durables)),
        "",
        *notes(runs),
    ]
    return "\n".join(lines)


def two_nodes(
    several: list[RunResult], single: dict[int, RunResult], pinned: bool
) -> list[str]:
    """The table of the runs on several Vapora processes, beside one process's."""
    count = several[0].nodes
    broker = "; ".join(
        f"{num(r.broker_cpu_s * 1e6 / max(1, r.deliveries), 1)} µs per delivery "
        f"at N = {r.subscribers:,}"
        for r in several
    )
    return [
        "## Two nodes" if count == 2 else f"## {count} nodes",
        "",
        f"Vapora as {count} processes on one SQLite file, joined by a throwaway "
        "redis-server on 127.0.0.1. Subscribers alternate between the nodes, and "
        "so do the changes, through each node's API; every workflow has "
        "subscribers and changes on each node. Memory, CPU and GC pauses are "
        "those of all the nodes together (summed; the longest pause of any). "
        + (
            "Node A pinned to core 0, node B to core 1; the load generator and "
            "Redis not pinned."
            if pinned
            else "Processes not pinned to cores."
        )
        + f" Redis itself used {broker} (not in the table).",
        "",
        "In brackets: the ratio to one Vapora process under the same load.",
        "",
        HEADER,
        *(row(r, single.get(r.subscribers)) for r in several),
        "",
    ]


def notes(runs: list[RunResult]) -> list[str]:
    """Say when a figure may describe the load generator more than the server."""
    out = []
    for run in runs:
        if run.generator_bound:
            out.append(
                f"- † {run.server} at N = {run.subscribers:,}: the load generator was "
                "near 100% of its core, so it, not the server, may have set the pace "
                "and part of the latency."
            )
        if run.generator_max_lag_ms > 5:
            out.append(
                f"- {run.server} at N = {run.subscribers:,}: the generator's own event "
                f"loop woke up to {run.generator_max_lag_ms:.1f} ms late while "
                "publishing; latencies include that."
            )
        if run.other_cpu_pct > 10:
            out.append(
                f"- {run.server} at N = {run.subscribers:,}: other processes on the "
                f"machine used {run.other_cpu_pct:.0f}% of a core while it published; "
                "the figures may be disturbed."
            )
        if run.late_starts:
            out.append(
                f"- {run.server} at N = {run.subscribers:,}: {run.late_starts} "
                "publishes started more than 5 ms behind schedule."
            )
        for problem in run.publish_errors[:3] + run.protocol_errors[:3]:
            out.append(f"- {run.server} at N = {run.subscribers:,}: {problem}")
    return (["## Notes", "", *out, ""]) if out else []
