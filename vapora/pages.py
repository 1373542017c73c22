"""The public HTML pages: the workflow list and one workflow's live page."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .app_keys import STORE
from .model import Step

routes = web.RouteTableDef()

HISTORY_ON_PAGE = 50


@routes.get("/", name="index")
@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    """List workflows, newest activity first."""
    store = request.app[STORE]
    return {"workflows": await store.list_workflows(100), "epoch": store.epoch}


@routes.get("/workflows/{workflow_id}", name="workflow")
@aiohttp_jinja2.template("workflow.html")
async def workflow_page(request: web.Request) -> dict[str, Any]:
    """Show one workflow as it is now; the client keeps it live. 404 if unknown."""
    store = request.app[STORE]
    workflow = await store.get_workflow(
        request.match_info["workflow_id"], history=HISTORY_ON_PAGE
    )
    return {"workflow": workflow, "epoch": store.epoch}


def step_duration(step: Step) -> str:
    """Format how long a step took, or has run so far, as 1h 2m 3s."""
    if step.started_at is None:
        return ""
    end = step.finished_at or step.started_at
    seconds = int(
        (
            datetime.fromisoformat(end) - datetime.fromisoformat(step.started_at)
        ).total_seconds()
    )
    return format_seconds(seconds)


def format_seconds(seconds: int) -> str:
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def utc_text(iso: str | None) -> str:
    """Show a stored time as readable UTC text, for pages seen without JavaScript."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")


TEMPLATE_FILTERS = {
    "duration": step_duration,
    "utc_text": utc_text,
}
