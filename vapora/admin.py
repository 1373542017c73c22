"""The admin pages: sign-in, and forms that create and drive workflows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .app_keys import AUTH, HUB, STORE
from .auth import ADMIN, CSRF_FIELD
from .credentials import Scope
from .errors import InvalidInput, TooManyRequests, VaporaError
from .model import Status, Workflow
from .store import Store
from .validate import clean_status, excerpt

routes = web.RouteTableDef()

FormAction = Callable[[Store, str, Any], Awaitable[Workflow]]


async def read_form(request: web.Request) -> dict[str, str]:
    """Return the posted form after checking its CSRF token (400, 403 when wrong)."""
    try:
        form = await request.post()
    except LookupError:
        charset = excerpt(request.charset or "")
        raise InvalidInput(None, f"the form's charset {charset} is unknown") from None
    except (ValueError, RuntimeError, HttpProcessingError, RequestPayloadError):
        # Such as a multipart body without its boundary, or broken inside, a
        # part in an unknown transfer encoding, or a body that fails to inflate.
        raise InvalidInput(None, "the form is malformed") from None
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    request.app[AUTH].check_csrf(request, fields.get(CSRF_FIELD, ""))
    return fields


async def require_admin(request: web.Request) -> None:
    """Send a visitor who has not signed in to the sign-in page."""
    if not await request.app[AUTH].is_signed_in(request):
        raise web.HTTPSeeOther(request.app.router["login"].url_for())


def render(
    request: web.Request, name: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    return aiohttp_jinja2.render_template(name, request, context, status=status)


@routes.get("/admin/login", name="login")
async def login_page(request: web.Request) -> web.Response:
    """Show the sign-in form."""
    return render(request, "login.html", {"errors": {}})


@routes.post("/admin/login", name="login_submit")
async def login(request: web.Request) -> web.Response:
    """Sign in with the admin token; 401 re-renders the form; 403 for bad CSRF."""
    form = await read_form(request)
    auth = request.app[AUTH]
    address = request.remote or "?"
    try:
        auth.throttle.check(address)
    except TooManyRequests as error:
        context = {"errors": {"token": error.message}}
        response = render(request, "login.html", context, status=429)
        response.headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
        return response

    if not auth.is_admin_token(form.get("token", "").strip()):
        auth.throttle.failed(address)
        errors = {"token": "That is not the admin token."}
        return render(request, "login.html", {"errors": errors}, status=401)

    auth.throttle.succeeded(address)
    response = web.HTTPSeeOther(request.app.router["admin"].url_for())
    await auth.sign_in(request, response)
    raise response


@routes.post("/admin/logout", name="logout")
async def logout(request: web.Request) -> web.Response:
    """Sign out; 403 on a bad CSRF token."""
    await read_form(request)

    response = web.HTTPSeeOther(request.app.router["login"].url_for())
    await request.app[AUTH].sign_out(request, response)
    raise response


@routes.get("/admin", name="admin")
async def admin_page(request: web.Request) -> web.Response:
    """List workflows with links to drive them, and the form to create one."""
    await require_admin(request)
    return await render_admin(request, {}, {})


async def render_admin(
    request: web.Request,
    errors: dict[str, str],
    values: dict[str, str],
    status: int = 200,
) -> web.Response:
    workflows = await request.app[STORE].list_workflows(200)
    hub = request.app[HUB]
    context = {
        "workflows": workflows,
        "errors": errors,
        "values": values,
        "watching": {w.id: hub.watching(w.id) for w in workflows},
    }
    return render(request, "admin.html", context, status=status)


@routes.post("/admin/workflows", name="admin_create")
async def create_workflow(request: web.Request) -> web.Response:
    """Create a workflow from the form; 400 re-renders the form with the message."""
    await require_admin(request)
    form = await read_form(request)

    try:
        workflow = await request.app[STORE].create_workflow(
            form.get("name"),
            form.get("steps", ""),
            ADMIN.actor,
            form.get("message", ""),
            form.get("stall_after_s") or None,
        )
    except VaporaError as error:
        return await render_admin(
            request, {error.field or "name": error.message}, form, status=error.status
        )

    raise web.HTTPSeeOther(
        request.app.router["admin_workflow"].url_for(workflow_id=workflow.id)
    )


@routes.get("/admin/workflows/{workflow_id}", name="admin_workflow")
async def admin_workflow_page(request: web.Request) -> web.Response:
    """Show the forms that drive one workflow; 404 if unknown."""
    await require_admin(request)
    return await render_admin_workflow(request, None, {}, {})


async def render_admin_workflow(
    request: web.Request,
    form_name: str | None,
    errors: dict[str, str],
    values: dict[str, str],
    status: int = 200,
    new_share_url: str | None = None,
) -> web.Response:
    workflow = await request.app[STORE].get_workflow(
        request.match_info["workflow_id"], history=20
    )
    shares = await request.app[AUTH].credentials.list_tokens(workflow.id)
    context = {
        "workflow": workflow,
        "statuses": list(Status),
        "form_name": form_name,
        "errors": errors,
        "values": values,
        "shares": [t for t in shares if t.scope is Scope.READ],
        "new_share_url": new_share_url,
    }
    return render(request, "admin_workflow.html", context, status=status)


def workflow_form(name: str, action: FormAction) -> None:
    """Register POST /admin/workflows/{id}/<name>, which runs action and redirects."""

    async def handler(request: web.Request) -> web.Response:
        await require_admin(request)
        form = await read_form(request)
        workflow_id = request.match_info["workflow_id"]

        try:
            await action(request.app[STORE], workflow_id, form)
        except VaporaError as error:
            if error.status == 404:
                raise
            errors = {error.field or "form": error.message}
            return await render_admin_workflow(
                request, name, errors, form, status=error.status
            )

        url = request.app.router["admin_workflow"].url_for(workflow_id=workflow_id)
        raise web.HTTPSeeOther(url.with_query(done=name))

    handler.__doc__ = f"Apply the {name} form; 400 or 409 re-render it with the reason."
    routes.post(f"/admin/workflows/{{workflow_id}}/{name}", name=f"admin_{name}")(
        handler
    )


def message_of(form: Any) -> str | None:
    message = form.get("message", "")
    return message if message.strip() else None


async def advance(store: Store, workflow_id: str, form: Any) -> Workflow:
    return await store.advance(workflow_id, ADMIN.actor, message_of(form))


async def set_status(store: Store, workflow_id: str, form: Any) -> Workflow:
    status = clean_status(form.get("status"))
    return await store.set_status(workflow_id, status, ADMIN.actor, message_of(form))


async def set_message(store: Store, workflow_id: str, form: Any) -> Workflow:
    return await store.set_message(workflow_id, form.get("message", ""), ADMIN.actor)


async def reopen(store: Store, workflow_id: str, form: Any) -> Workflow:
    return await store.reopen(workflow_id, ADMIN.actor, message_of(form))


async def reset(store: Store, workflow_id: str, form: Any) -> Workflow:
    if form.get("confirm") != "yes":
        raise InvalidInput("confirm", "tick the box to confirm going back to step 0")
    return await store.reset(workflow_id, ADMIN.actor, message_of(form))


async def answer_gate(store: Store, workflow_id: str, form: Any) -> Workflow:
    return await store.answer_gate(
        workflow_id, form.get("decision"), ADMIN.actor, form.get("comment", "")
    )


workflow_form("gate", answer_gate)
workflow_form("advance", advance)
workflow_form("status", set_status)
workflow_form("message", set_message)
workflow_form("reopen", reopen)
workflow_form("reset", reset)


@routes.post("/admin/workflows/{workflow_id}/share", name="admin_share")
async def create_share_link(request: web.Request) -> web.Response:
    """Make a read-only link to one workflow and show it once; 403, 404."""
    await require_admin(request)
    await read_form(request)
    workflow_id = request.match_info["workflow_id"]
    credentials = request.app[AUTH].credentials

    _, secret = await credentials.create_share_link(workflow_id)

    path = request.app.router["share"].url_for(secret=secret)
    url = str(request.url.with_path(str(path)).with_query(None))
    return await render_admin_workflow(request, None, {}, {}, new_share_url=url)
