"""Admin pages for what reaches in from outside: API tokens and webhooks."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .admin import read_form, render, require_admin
from .app_keys import AUTH, STORE, WEBHOOKS
from .credentials import Scope, clean_scope
from .errors import VaporaError
from .webhooks import EVENTS

routes = web.RouteTableDef()


def form_page(
    request: web.Request,
    template: str,
    context: dict[str, Any],
    errors: dict[str, str],
    values: dict[str, str],
    status: int,
    new_secret: str | None,
) -> web.Response:
    """A page whose form makes a secret: what was typed, what was wrong with it,
    and the secret just made, shown this once."""
    context.update(errors=errors, values=values, new_secret=new_secret)
    return render(request, template, context, status=status)


@routes.get("/admin/tokens", name="admin_tokens")
async def tokens_page(request: web.Request) -> web.Response:
    """List API tokens, with the form to make one."""
    await require_admin(request)
    return await render_tokens(request, {}, {})


async def render_tokens(
    request: web.Request,
    errors: dict[str, str],
    values: dict[str, str],
    status: int = 200,
    new_secret: str | None = None,
) -> web.Response:
    tokens = await request.app[AUTH].credentials.list_tokens()
    context = {
        "tokens": [t for t in tokens if not (t.scope is Scope.READ and t.workflow_id)],
        "scopes": list(Scope),
        "workflows": await request.app[STORE].list_workflows(500),
    }
    return form_page(
        request, "admin_tokens.html", context, errors, values, status, new_secret
    )


@routes.post("/admin/tokens", name="admin_create_token")
async def create_token(request: web.Request) -> web.Response:
    """Make a token and show its secret once; 400 re-renders the form."""
    await require_admin(request)
    form = await read_form(request)

    try:
        scope = clean_scope(form.get("scope"))
        _, secret = await request.app[AUTH].credentials.create_token(
            form.get("name"), scope, form.get("workflow_id") or None
        )
    except VaporaError as error:
        errors = {error.field or "name": error.message}
        return await render_tokens(request, errors, form, status=error.status)

    return await render_tokens(request, {}, {}, status=201, new_secret=secret)


@routes.post("/admin/tokens/{token_id}/revoke", name="admin_revoke_token")
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke a token at once, then go back where the form was; 403, 404."""
    await require_admin(request)
    form = await read_form(request)

    await request.app[AUTH].credentials.revoke(request.match_info["token_id"])

    back = form.get("back", "")
    if not back.startswith(str(request.app.router["admin"].url_for())):
        back = str(request.app.router["admin_tokens"].url_for())
    raise web.HTTPSeeOther(back)


@routes.get("/admin/webhooks", name="admin_webhooks")
async def webhooks_page(request: web.Request) -> web.Response:
    """List webhooks and their latest deliveries, with the form to add one."""
    await require_admin(request)
    return await render_webhooks(request, {}, {})


async def render_webhooks(
    request: web.Request,
    errors: dict[str, str],
    values: dict[str, str],
    status: int = 200,
    new_secret: str | None = None,
) -> web.Response:
    webhooks = request.app[WEBHOOKS]
    context = {
        "webhooks": webhooks.all(),
        "deliveries": await webhooks.deliveries(),
        "events": EVENTS,
    }
    return form_page(
        request, "admin_webhooks.html", context, errors, values, status, new_secret
    )


@routes.post("/admin/webhooks", name="admin_create_webhook")
async def create_webhook(request: web.Request) -> web.Response:
    """Add a webhook and show its signing secret once; 400 re-renders the form."""
    await require_admin(request)
    form = await read_form(request)
    post = await request.post()
    events = [e for e in post.getall("events", []) if isinstance(e, str)] or None

    try:
        hook = await request.app[WEBHOOKS].create(form.get("url"), events)
    except VaporaError as error:
        errors = {error.field or "url": error.message}
        return await render_webhooks(request, errors, form, status=error.status)

    return await render_webhooks(request, {}, {}, status=201, new_secret=hook.secret)


@routes.post("/admin/webhooks/{webhook_id}/delete", name="admin_delete_webhook")
async def delete_webhook(request: web.Request) -> web.Response:
    """Remove a webhook, then show the list again; 403, 404."""
    await require_admin(request)
    await read_form(request)

    await request.app[WEBHOOKS].delete(request.match_info["webhook_id"])

    raise web.HTTPSeeOther(request.app.router["admin_webhooks"].url_for())
