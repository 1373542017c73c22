"""Build the application: store, hub, auth, routes and templates."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from . import admin, admin_access, api, collector, metrics, pages, sse, ws
from .admission import OPEN_CONNECTIONS
from .app_keys import AUTH, HUB, SETTINGS, STATS, STORE, WEBHOOKS
from .auth import Auth
from .hub import Hub
from .middleware import request_middleware
from .model import utc_now
from .settings import Settings
from .stats import Stats
from .store import Store
from .timers import run_timers
from .webhooks import CLUSTER_RELOAD_S, Webhooks

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PACKAGE_DIR = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path:
    """Find templates/ or static/: inside the installed package, or in a checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"cannot find the {name}/ folder next to {PACKAGE_DIR}")


def create_app(settings: Settings) -> web.Application:
    """Return the application for these settings; the store opens on start-up."""
    app = web.Application(
        middlewares=[request_middleware], client_max_size=settings.max_body_bytes
    )
    stats = Stats()
    store = Store(settings.db, stats)
    app[SETTINGS] = settings
    app[STORE] = store
    app[AUTH] = Auth(store, settings)
    app[OPEN_CONNECTIONS] = Counter()
    hub = Hub(stats)
    app[HUB] = hub
    app[metrics.READINESS_CHECKS] = []
    if not settings.broker:
        store.add_listener(hub.publish)
    webhooks = Webhooks(store, settings)
    store.add_listener(webhooks.on_change)
    app[WEBHOOKS] = webhooks
    app[STATS] = stats
    app[metrics.REGISTRY] = metrics.make_registry(hub, stats)

    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(asset_dir("templates")),
        autoescape=True,
    )
    env.filters.update(pages.TEMPLATE_FILTERS)

    app.cleanup_ctx.append(_store_and_hub)
    if settings.broker:
        _join_cluster(app, settings.broker)
    app.on_shutdown.append(ws.close_all_sockets)

    app.router.add_get("/api/updates", ws.subscribe, name="list_socket")
    app.router.add_get(
        "/api/workflows/{workflow_id}/updates", ws.subscribe, name="workflow_socket"
    )
    app.router.add_get(
        "/api/workflows/{workflow_id}/events",
        sse.workflow_events,
        name="workflow_events",
    )
    app.router.add_routes(api.routes)
    app.router.add_routes(pages.routes)
    app.router.add_routes(admin.routes)
    app.router.add_routes(admin_access.routes)
    app.router.add_routes(metrics.routes)
    app.router.add_static(
        "/static", asset_dir("static"), name="static", append_version=True
    )

    def static(filename: str) -> str:
        return str(app.router["static"].url_for(filename=filename))

    env.globals.update(static=static, loaded_at=utc_now)
    if not settings.base_path:
        return app
    # Mounted under the prefix, every url_for, and so every link, form and
    # socket URL, carries it.
    root = web.Application(client_max_size=settings.max_body_bytes)
    root.add_subapp(settings.base_path, app)
    root[SETTINGS] = settings
    root[STORE] = store
    root[AUTH] = app[AUTH]
    root[HUB] = hub
    root[STATS] = stats
    root[WEBHOOKS] = webhooks
    return root


def _join_cluster(app: web.Application, url: str) -> None:
    """Pass changes to and from the other nodes through the broker at url."""
    # Imported here, so that Redis's client loads only where a broker is used.
    from .broker import Broker

    broker = Broker(url, app[STORE], app[HUB])
    app[STORE].add_listener(broker.on_commit)
    app[metrics.READINESS_CHECKS].append(lambda: broker.problem)

    async def connected(app: web.Application) -> AsyncIterator[None]:
        await broker.start()
        yield
        await broker.stop()

    # Added after the store's: it opens first, and the channel is named after
    # its epoch; the broker stops before the store closes.
    app.cleanup_ctx.append(connected)


async def _store_and_hub(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.open()
    hub = app[HUB]
    hub.epoch = store.epoch
    await app[AUTH].setup()
    settings = app[SETTINGS]
    await app[WEBHOOKS].start(CLUSTER_RELOAD_S if settings.broker else None)
    pauses = collector.PauseTimer(app[STATS])
    pauses.install()
    tasks = [
        asyncio.create_task(hub.run_heartbeats(settings.heartbeat_s)),
        asyncio.create_task(hub.run_presence(settings.presence_interval_s)),
    ]
    if settings.gc_freeze_interval_s > 0:
        freezing = collector.freeze_long_lived(hub, settings.gc_freeze_interval_s)
        tasks.append(asyncio.create_task(freezing))
    tasks.append(asyncio.create_task(run_timers(store, settings.timer_interval_s)))
    if settings.retention_days > 0:
        tasks.append(asyncio.create_task(prune_forever(store, settings)))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pauses.remove()
    await app[WEBHOOKS].stop()
    await store.close()


async def prune_forever(store: Store, settings: Settings) -> None:
    """Apply the retention setting now, then every prune_interval_s."""
    while True:
        cutoff = datetime.now(UTC) - timedelta(days=settings.retention_days)
        try:
            workflows, events = await store.prune(
                cutoff.isoformat(timespec="milliseconds")
            )
        except Exception:
            logger.exception("Pruning old workflows and events failed")
        else:
            if workflows or events:
                logger.info(
                    "Pruned %d finished workflows and %d events older than %s",
                    workflows,
                    events,
                    cutoff.isoformat(timespec="seconds"),
                )
        await asyncio.sleep(settings.prune_interval_s)
