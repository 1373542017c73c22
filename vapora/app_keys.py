"""Typed keys for what the application holds."""

from __future__ import annotations

from aiohttp import web

from .auth import Auth
from .hub import Hub
from .settings import Settings
from .stats import Stats
from .store import Store
from .webhooks import Webhooks

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
AUTH = web.AppKey("auth", Auth)
STATS = web.AppKey("stats", Stats)
WEBHOOKS = web.AppKey("webhooks", Webhooks)
