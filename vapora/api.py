"""The JSON API under /api/workflows, for scripts and the command line."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .app_keys import AUTH, STORE, WEBHOOKS
from .catchup import workflow_json
from .credentials import Token, clean_scope
from .errors import InvalidInput
from .model import Workflow
from .validate import clean_status, excerpt, parse_count

routes = web.RouteTableDef()

MAX_LIST = 500


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# Made once: json.loads with any option builds a new decoder on every call.
_STRICT_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def loads_strict(text: str) -> Any:
    """Parse JSON as RFC 8259 has it: NaN and Infinity are no numbers."""
    return _STRICT_DECODER.decode(text)


async def readable_workflows(request: web.Request, limit: int) -> list[Workflow]:
    """Return the newest workflows that this request may read."""
    auth = request.app[AUTH]
    store = request.app[STORE]
    if await auth.reads_everything(request):
        return await store.list_workflows(limit)
    principal = await auth.principal(request)
    ids = await auth.shared_with(request)
    if principal is not None and principal.workflow_id:
        ids.add(principal.workflow_id)
    return await store.list_workflows(limit, only=ids)


def workflow_response(workflow: Workflow, status: int = 200) -> web.Response:
    """Answer with the workflow, and its history only where it was read."""
    body = workflow_json(workflow, history=bool(workflow.history))
    return web.Response(text=body, status=status, content_type="application/json")


async def read_json(request: web.Request, *fields: str) -> dict[str, Any]:
    """Return the request's JSON object of these fields; 400 names anything else."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json(loads=loads_strict)
    except (ValueError, UnicodeDecodeError):
        # JSONDecodeError, and NaN or Infinity, are ValueErrors.
        raise InvalidInput(None, "the body is not valid JSON") from None
    except RecursionError:
        raise InvalidInput(
            None, "the body is not valid JSON: nested too deeply"
        ) from None
    except LookupError:
        charset = excerpt(request.charset or "")
        raise InvalidInput(None, f"the body's charset {charset} is unknown") from None
    except RequestPayloadError:
        raise InvalidInput(None, "the body could not be decompressed") from None
    if not isinstance(body, dict):
        raise InvalidInput(None, "the body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        expected = ", ".join(fields) or "no fields"
        raise InvalidInput(
            unknown[0], f"unknown field {unknown[0]!r}; expected {expected}"
        )
    return body


@routes.post("/api/workflows")
async def create_workflow(request: web.Request) -> web.Response:
    """Create a workflow from {name, steps, message?}; 400 names the field; 401, 403."""
    actor = await request.app[AUTH].require_publish(request, None)
    body = await read_json(request, "name", "steps", "message", "stall_after_s")

    workflow = await request.app[STORE].create_workflow(
        body.get("name"),
        body.get("steps"),
        actor,
        body.get("message", ""),
        body.get("stall_after_s"),
    )

    response = workflow_response(workflow, status=201)
    location = request.app.router["workflow_api"].url_for(workflow_id=workflow.id)
    response.headers["Location"] = str(location)
    return response


@routes.get("/api/workflows")
async def list_workflows(request: web.Request) -> web.Response:
    """List workflows, newest activity first; `limit` up to 500 (400 otherwise)."""
    raw = request.query.get("limit", "100")
    limit = parse_count(raw, MAX_LIST)
    if limit is None or limit < 1:
        raise InvalidInput(
            "limit", f"limit must be 1 to {MAX_LIST}, got {excerpt(raw)}"
        )

    workflows = await readable_workflows(request, limit)

    body = ",".join(workflow_json(w, history=False) for w in workflows)
    return web.Response(
        text='{"workflows":[' + body + "]}", content_type="application/json"
    )


@routes.get("/api/workflows/{workflow_id}", name="workflow_api")
async def get_workflow(request: web.Request) -> web.Response:
    """Return one workflow with its recent history; 401 if private, 404 if unknown."""
    await request.app[AUTH].require_read(request, request.match_info["workflow_id"])
    workflow = await request.app[STORE].get_workflow(
        request.match_info["workflow_id"], history=50
    )
    return workflow_response(workflow)


@routes.post("/api/workflows/{workflow_id}/advance")
async def advance(request: web.Request) -> web.Response:
    """Finish the current step and start the next; 404, 409 when finished."""
    actor = await request.app[AUTH].require_publish(
        request, request.match_info["workflow_id"]
    )
    body = await read_json(request, "message")

    workflow = await request.app[STORE].advance(
        request.match_info["workflow_id"], actor, body.get("message")
    )
    return workflow_response(workflow)


@routes.post("/api/workflows/{workflow_id}/status")
async def set_status(request: web.Request) -> web.Response:
    """Set {status, message?}; `reopen: true` revives a finished one; 400, 404, 409."""
    actor = await request.app[AUTH].require_publish(
        request, request.match_info["workflow_id"]
    )
    body = await read_json(request, "status", "message", "reopen")
    status = clean_status(body.get("status"))
    reopen = body.get("reopen", False)
    if not isinstance(reopen, bool):
        raise InvalidInput("reopen", "reopen must be true or false")

    store = request.app[STORE]
    workflow_id = request.match_info["workflow_id"]
    message = body.get("message")
    if reopen:
        actor = await request.app[AUTH].require_admin(request)
        workflow = await store.reopen(workflow_id, actor, message, status)
    else:
        workflow = await store.set_status(workflow_id, status, actor, message)
    return workflow_response(workflow)


@routes.post("/api/workflows/{workflow_id}/gate")
async def answer_gate(request: web.Request) -> web.Response:
    """Approve or reject the waiting step with {decision, comment}; 400, 403, 409."""
    auth = request.app[AUTH]
    workflow_id = request.match_info["workflow_id"]
    actor = await auth.require_gate(request, workflow_id)
    body = await read_json(request, "decision", "comment")

    workflow = await request.app[STORE].answer_gate(
        workflow_id, body.get("decision"), actor, body.get("comment")
    )
    return workflow_response(workflow)


@routes.post("/api/workflows/{workflow_id}/message")
async def set_message(request: web.Request) -> web.Response:
    """Replace the message with {message}; 400 for a bad message, 404."""
    actor = await request.app[AUTH].require_publish(
        request, request.match_info["workflow_id"]
    )
    body = await read_json(request, "message")
    if "message" not in body:
        raise InvalidInput("message", "message is required")

    workflow = await request.app[STORE].set_message(
        request.match_info["workflow_id"], body["message"], actor
    )
    return workflow_response(workflow)


@routes.post("/api/workflows/{workflow_id}/reset")
async def reset(request: web.Request) -> web.Response:
    """Send the workflow back to step 0 on purpose; admin only (401, 403), 404."""
    actor = await request.app[AUTH].require_admin(request)
    body = await read_json(request, "message")

    workflow = await request.app[STORE].reset(
        request.match_info["workflow_id"], actor, body.get("message")
    )
    return workflow_response(workflow)


@routes.get("/api/workflows/{workflow_id}/history", name="workflow_history")
async def history(request: web.Request) -> web.Response:
    """Return the newest events of a workflow, newest first; 401, 404."""
    await request.app[AUTH].require_read(request, request.match_info["workflow_id"])
    workflow = await request.app[STORE].get_workflow(
        request.match_info["workflow_id"], history=200
    )
    events = [e.as_dict() for e in workflow.history]
    return web.json_response({"workflow_id": workflow.id, "events": events})


@routes.post("/api/tokens")
async def create_token(request: web.Request) -> web.Response:
    """Make a token from {name, scope, workflow_id?}; admin only; 400 names a field."""
    await request.app[AUTH].require_admin(request)
    body = await read_json(request, "name", "scope", "workflow_id")
    scope = clean_scope(body.get("scope"))
    workflow_id = body.get("workflow_id")
    if workflow_id is not None and not isinstance(workflow_id, str):
        raise InvalidInput("workflow_id", "workflow_id must be a string")

    token, secret = await request.app[AUTH].credentials.create_token(
        body.get("name"), scope, workflow_id
    )
    return web.json_response(dict(token_json(token), token=secret), status=201)


@routes.get("/api/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    """List live tokens (never their secrets); admin only."""
    await request.app[AUTH].require_admin(request)
    tokens = await request.app[AUTH].credentials.list_tokens()
    return web.json_response({"tokens": [token_json(t) for t in tokens]})


@routes.delete("/api/tokens/{token_id}")
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke a token at once; admin only; 404 if there is no such live token."""
    await request.app[AUTH].require_admin(request)
    await request.app[AUTH].credentials.revoke(request.match_info["token_id"])
    return web.Response(status=204)


def token_json(token: Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "scope": token.scope.value,
        "workflow_id": token.workflow_id,
        "created_at": token.created_at,
    }


@routes.post("/api/webhooks")
async def create_webhook(request: web.Request) -> web.Response:
    """Add a webhook from {url, events?}; answers its secret once; admin; 400."""
    await request.app[AUTH].require_admin(request)
    body = await read_json(request, "url", "events")

    hook = await request.app[WEBHOOKS].create(body.get("url"), body.get("events"))

    return web.json_response(dict(hook.as_json(), secret=hook.secret), status=201)


@routes.get("/api/webhooks")
async def list_webhooks(request: web.Request) -> web.Response:
    """List webhooks and their latest deliveries; admin only."""
    await request.app[AUTH].require_admin(request)
    webhooks = request.app[WEBHOOKS]
    return web.json_response(
        {
            "webhooks": [h.as_json() for h in webhooks.all()],
            "deliveries": await webhooks.deliveries(),
        }
    )


@routes.delete("/api/webhooks/{webhook_id}")
async def delete_webhook(request: web.Request) -> web.Response:
    """Remove a webhook; admin only; 404 if there is none with that id."""
    await request.app[AUTH].require_admin(request)
    await request.app[WEBHOOKS].delete(request.match_info["webhook_id"])
    return web.Response(status=204)
