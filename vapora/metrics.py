"""/metrics in the Prometheus text format, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .app_keys import STORE
from .hub import Hub
from .stats import Histogram, Stats

routes = web.RouteTableDef()
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
# Each check names why the node is not ready, or returns None when it is.
ReadinessCheck = Callable[[], str | None]
READINESS_CHECKS = web.AppKey("readiness_checks", list[ReadinessCheck])
READY_TIMEOUT_S = 2.0


class VaporaCollector(Collector):
    """Reads the hub and the counters at scrape time."""

    def __init__(self, hub: Hub, stats: Stats) -> None:
        self.hub = hub
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        connections = GaugeMetricFamily(
            "vapora_open_connections", "Open sockets and streams", labels=["transport"]
        )
        for transport, count in sorted(self.hub.count_by_transport().items()):
            connections.add_metric([transport], count)
        yield connections
        yield GaugeMetricFamily(
            "vapora_subscribers",
            "Subscribers of any kind",
            value=self.hub.subscribers(),
        )
        yield GaugeMetricFamily(
            "vapora_watched_workflows",
            "Workflows with at least one subscriber",
            value=self.hub.watched_workflows(),
        )
        yield CounterMetricFamily(
            "vapora_frames_sent",
            "Update frames handed to sockets",
            value=stats.frames_sent,
        )
        yield CounterMetricFamily(
            "vapora_updates_collapsed",
            "Times a slow subscriber skipped updates for the latest state",
            value=stats.updates_collapsed,
        )
        yield CounterMetricFamily(
            "vapora_slow_clients_closed",
            "Subscribers closed for taking no data",
            value=stats.slow_clients_closed,
        )
        resumes = CounterMetricFamily(
            "vapora_resumes", "Reconnections served, by how", labels=["served_from"]
        )
        for kind in ("log", "snapshot"):
            resumes.add_metric([kind], stats.resumes[kind])
        yield resumes
        requests = CounterMetricFamily(
            "vapora_http_requests", "HTTP requests", labels=["route", "status"]
        )
        for (route, status), count in sorted(stats.requests.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        yield _histogram(
            "vapora_publish_to_send_seconds",
            "From commit to the last subscriber's socket buffer",
            stats.publish_seconds,
        )
        yield _histogram(
            "vapora_gc_pause_seconds",
            "Garbage collections, each a pause of the whole server",
            stats.gc_pause_seconds,
        )
        yield GaugeMetricFamily(
            "vapora_gc_pause_max_seconds",
            "Longest garbage-collection pause since start",
            value=stats.gc_pause_max_seconds,
        )
        yield _histogram(
            "vapora_store_write_seconds",
            "One change's transaction in the store",
            stats.store_write_seconds,
        )


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, doc, buckets=histogram.cumulative(), sum_value=histogram.total
    )


def make_registry(hub: Hub, stats: Stats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VaporaCollector(hub, stats))
    return registry


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Export the server's metrics in the Prometheus text format."""
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Answer 200 while the process runs."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Answer 200 when the database takes a write and the broker is up, else 503."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(
            request.app[STORE].set_meta("ready_check", str(started)), READY_TIMEOUT_S
        )
    except Exception as error:  # any failure means not ready
        body = {"status": "unavailable", "reason": f"database write failed: {error!r}"}
        return web.json_response(body, status=503)
    for check in request.app.get(READINESS_CHECKS, []):
        problem = check()
        if problem is not None:
            body = {"status": "unavailable", "reason": problem}
            return web.json_response(body, status=503)
    return web.json_response({"status": "ok"})
