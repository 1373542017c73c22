"""The public HTML pages: the workflow list and one workflow's live page."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .api import readable_workflows
from .app_keys import AUTH, HUB, STORE
from .credentials import Scope
from .errors import NotFound
from .model import Step, StepState, Workflow

routes = web.RouteTableDef()

HISTORY_ON_PAGE = 50


@routes.get("/", name="index")
@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    """List the workflows this visitor may read, newest activity first."""
    store = request.app[STORE]
    workflows = await readable_workflows(request, 100)
    everything = await request.app[AUTH].reads_everything(request)
    hub = request.app[HUB]
    return {
        "workflows": workflows,
        "epoch": store.epoch,
        "live_list": everything,
        "watching": {w.id: hub.watching(w.id) for w in workflows},
    }


@routes.get("/workflows/{workflow_id}", name="workflow")
@aiohttp_jinja2.template("workflow.html")
async def workflow_page(request: web.Request) -> dict[str, Any]:
    """Show one workflow as it is now; the client keeps it live. 401, 404."""
    await request.app[AUTH].require_read(request, request.match_info["workflow_id"])
    store = request.app[STORE]
    workflow = await store.get_workflow(
        request.match_info["workflow_id"], history=HISTORY_ON_PAGE
    )
    medians = await store.step_medians(workflow.name)
    return {
        "workflow": workflow,
        "epoch": store.epoch,
        "watching": request.app[HUB].watching(workflow.id),
        "medians": medians,
        "finish_at": estimate_finish(workflow, medians),
    }


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


def estimate_finish(workflow: Workflow, medians: dict[str, float]) -> str | None:
    """Guess when the workflow ends, from how long its steps usually take."""
    if workflow.status.is_final or not medians:
        return None
    now = datetime.now(UTC)
    remaining = 0.0
    for index, step in enumerate(workflow.steps, start=1):
        usual = medians.get(step.name)
        if usual is None:
            return None
        if step.state is StepState.RUNNING and step.started_at:
            elapsed = (now - datetime.fromisoformat(step.started_at)).total_seconds()
            remaining += max(0.0, usual - elapsed)
        elif step.state is StepState.PENDING or index > workflow.current_step:
            remaining += usual
    return (now + timedelta(seconds=remaining)).isoformat(timespec="milliseconds")


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


def gate_note(step: Step) -> str:
    """Describe a step's gate: who may answer, or what they answered."""
    gate = step.gate
    if gate is None:
        return ""
    if gate.decision is None:
        return f"needs approval from {gate.who}"
    return f"{gate.decision} by {gate.decided_by}: {gate.comment}"


TEMPLATE_FILTERS: dict[str, Callable[..., str]] = {
    "gate_note": gate_note,
    "seconds": lambda s: format_seconds(int(s)),
    "duration": step_duration,
    "utc_text": utc_text,
}
