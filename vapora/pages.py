"""The public HTML pages: the workflow list and one workflow's live page."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .api import readable_workflows
from .app_keys import AUTH, STORE
from .credentials import Scope
from .errors import NotFound
from .model import Step

routes = web.RouteTableDef()

HISTORY_ON_PAGE = 50


@routes.get("/", name="index")
@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    """List the workflows this visitor may read, newest activity first."""
    store = request.app[STORE]
    workflows = await readable_workflows(request, 100)
    everything = await request.app[AUTH].reads_everything(request)
    return {"workflows": workflows, "epoch": store.epoch, "live_list": everything}


@routes.get("/workflows/{workflow_id}", name="workflow")
@aiohttp_jinja2.template("workflow.html")
async def workflow_page(request: web.Request) -> dict[str, Any]:
    """Show one workflow as it is now; the client keeps it live. 401, 404."""
    await request.app[AUTH].require_read(request, request.match_info["workflow_id"])
    store = request.app[STORE]
    workflow = await store.get_workflow(
        request.match_info["workflow_id"], history=HISTORY_ON_PAGE
    )
    return {"workflow": workflow, "epoch": store.epoch}


@routes.get("/share/{secret}", name="share")
async def open_share_link(request: web.Request) -> web.Response:
    """Trade a share link for a cookie and go to its workflow; 404 if not valid."""
    auth = request.app[AUTH]
    token = await auth.credentials.find(request.match_info["secret"])
    if token is None or token.scope is not Scope.READ or token.workflow_id is None:
        raise NotFound("secret", "this share link is not valid or was revoked")

    # The secret leaves the address bar at once: it lives on in a cookie only.
    response = web.HTTPSeeOther(
        request.app.router["workflow"].url_for(workflow_id=token.workflow_id)
    )
    secret = request.match_info["secret"]
    auth.remember_share(request, response, token.workflow_id, secret)
    raise response


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
