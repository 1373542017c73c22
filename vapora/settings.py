"""Settings, declared once: name, type, default, unit and help.

Each is read from a command-line flag, else a VAPORA_<NAME> environment
variable, else the TOML file given with --config, else its default, and is
checked at start-up with an error that names the setting and the value.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from yarl import URL

SECRET_SETTINGS = frozenset({"admin_token"})
BROKER_SCHEMES = ("redis://", "rediss://", "unix://")


def setting(
    default: Any,
    help: str,
    unit: str = "",
    choices: tuple[str, ...] = (),
    bounds: tuple[float, float] | None = None,
    off: float | None = None,
) -> Any:
    """Declare a setting; a number outside bounds is refused, but for `off`."""
    return field(
        default=default,
        metadata={
            "help": help,
            "unit": unit,
            "choices": choices,
            "bounds": bounds,
            "off": off,
        },
    )


# Ranges of the time settings: an interval of 0 would spin a core, and past a
# few years a date or timer overflows.
MIN_INTERVAL_S = 0.01
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
KIB, MIB, GIB = 1024, 1024**2, 1024**3


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8080, "TCP port to listen on (0 picks a free one)")
    db: str = setting(
        "./vapora.db",
        "SQLite database file (or sqlite:///PATH), or a postgresql:// URL",
    )
    broker: str = setting(
        "",
        "redis:// URL of the broker that passes changes between several Vapora "
        "processes sharing one database; empty for a single process",
    )
    admin_token: str = setting(
        "", "admin token; when empty, one is generated at first start and logged once"
    )
    base_path: str = setting(
        "", "URL prefix the server is mounted under behind a proxy, such as /vapora"
    )
    trusted_proxies: str = setting(
        "",
        "comma-separated addresses of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto headers are believed",
    )
    read_access: str = setting(
        "public",
        "who may read workflows: anyone with the URL, or only signed-in admins, "
        "read tokens and share links",
        choices=("public", "private"),
    )
    allowed_origins: str = setting(
        "", "comma-separated origins, besides this server's, that may open sockets"
    )
    heartbeat_s: float = setting(
        20.0,
        "time between pings and heartbeats on each socket",
        unit="s",
        bounds=(0.1, HOUR_S),
    )
    max_queue_bytes: int = setting(
        64 * 1024,
        "data queued for one socket before it gets the latest state instead",
        unit="bytes",
        bounds=(KIB, GIB),
    )
    stuck_timeout_s: float = setting(
        30.0,
        "time a socket may stay unable to take data before it is closed",
        unit="s",
        bounds=(0.1, DAY_S),
    )
    max_resume_events: int = setting(
        1000,
        "most missed events replayed on resume; past that, a fresh snapshot",
        bounds=(0, 1_000_000),
    )
    # For aiohttp, a size limit of 0 means none: these bounds start above it.
    max_incoming_bytes: int = setting(
        4096, "largest frame a client may send", unit="bytes", bounds=(64, MIB)
    )
    max_body_bytes: int = setting(
        64 * 1024, "largest request body accepted", unit="bytes", bounds=(KIB, GIB)
    )
    max_connections_per_address: int = setting(
        64,
        "most open sockets and event streams from one client address",
        bounds=(1, 1_000_000),
    )
    session_hours: float = setting(
        12.0, "how long an admin sign-in lasts", unit="h", bounds=(0.01, 366 * 24)
    )
    retention_days: float = setting(
        30.0,
        "age after which events and finished workflows are pruned; 0 keeps all",
        unit="days",
        bounds=(0.001, 36500),
        off=0,
    )
    prune_interval_s: float = setting(
        3600.0, "time between retention passes", unit="s", bounds=(1, 30 * DAY_S)
    )
    presence_interval_s: float = setting(
        1.0,
        "most often the count of watchers is sent to a page",
        unit="s",
        bounds=(MIN_INTERVAL_S, DAY_S),
    )
    gc_freeze_interval_s: float = setting(
        1.0,
        "time between freezes of long-lived objects, which keeps garbage "
        "collections short with many sockets open; 0 never freezes",
        unit="s",
        bounds=(MIN_INTERVAL_S, DAY_S),
        off=0,
    )
    timer_interval_s: float = setting(
        1.0,
        "time between checks for gate timeouts and stalled workflows",
        unit="s",
        bounds=(MIN_INTERVAL_S, HOUR_S),
    )
    webhook_timeout_s: float = setting(
        5.0,
        "time a webhook endpoint has to answer one delivery",
        unit="s",
        bounds=(0.1, HOUR_S),
    )
    webhook_attempts: int = setting(
        5, "attempts per webhook delivery before giving up", bounds=(1, 100)
    )
    webhook_retry_base_s: float = setting(
        1.0,
        "wait before the first retry; doubled after each",
        unit="s",
        bounds=(MIN_INTERVAL_S, HOUR_S),
    )
    shutdown_timeout_s: float = setting(
        3.0,
        "time given to open requests on shutdown",
        unit="s",
        bounds=(0.1, HOUR_S),
    )
    log_level: str = setting(
        "INFO",
        "least severe log level written",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    )
    log_format: str = setting(
        "text", "log lines as text, or as JSON objects", choices=("text", "json")
    )

    @property
    def origins(self) -> frozenset[str]:
        return _csv(self.allowed_origins)

    @property
    def proxies(self) -> frozenset[str]:
        return _csv(self.trusted_proxies)

    def public_items(self) -> dict[str, Any]:
        """The settings an operator wants in the start-up log, never a secret."""
        items: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in SECRET_SETTINGS:
                value = getattr(self, f.name)
                # A database or broker URL may carry a password.
                items[f.name] = (
                    hide_password(value) if isinstance(value, str) else value
                )
        return items

    @classmethod
    def declared(cls) -> list[Any]:
        return list(fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        return str(_field(name).metadata["help"])

    @classmethod
    def default(cls, name: str) -> Any:
        return _field(name).default

    @classmethod
    def load(
        cls,
        given: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config: str | Path | None = None,
    ) -> Settings:
        """Build settings from flags, then VAPORA_* variables, then a TOML file.

        Raises ValueError naming the setting and the value when one is wrong.
        """
        given = given or {}
        environ = os.environ if environ is None else environ
        from_file = _read_toml(config) if config else {}
        unknown = set(from_file) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{config}: unknown setting {sorted(unknown)[0]!r}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            env_name = "VAPORA_" + f.name.upper()
            if given.get(f.name) is not None:
                raw, source = given[f.name], f"--{f.name.replace('_', '-')}"
            elif env_name in environ:
                raw, source = environ[env_name], env_name
            elif f.name in from_file:
                raw, source = from_file[f.name], f"{config}: {f.name}"
            else:
                continue
            values[f.name] = _convert(f, raw, source)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ValueError for values that are well-typed but make no sense."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0 to 65535, got {self.port}")
        if self.base_path and (
            not self.base_path.startswith("/") or self.base_path.endswith("/")
        ):
            raise ValueError(
                f"base_path starts with / and does not end with one: {self.base_path!r}"
            )
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be above 0, got {self.heartbeat_s}")
        if self.admin_token != self.admin_token.strip():
            # Tokens are stripped where they are given, so it could never match.
            raise ValueError("admin_token must not start or end with a space")
        # Both are compared as text with what a request carries, so each must
        # be written as the request would write it.
        for proxy in self.proxies:
            if not is_address(proxy):
                raise ValueError(
                    f"trusted_proxies must list IP addresses, got {proxy!r}"
                )
            if (usual := str(ipaddress.ip_address(proxy))) != proxy:
                raise ValueError(f"trusted_proxies: write {proxy!r} as {usual!r}")
        for origin in self.origins:
            if not _is_origin(origin):
                raise ValueError(
                    "allowed_origins must list origins such as "
                    f"https://example.com, got {origin!r}"
                )
            if (usual := str(URL(origin).origin())) != origin:
                raise ValueError(f"allowed_origins: write {origin!r} as {usual!r}")
        if self.broker and not self.broker.startswith(BROKER_SCHEMES):
            raise ValueError(
                f"broker must be a redis://, rediss:// or unix:// URL, "
                f"got {hide_password(self.broker)!r}"
            )


def hide_password(value: str) -> str:
    """Return a URL without the password it may carry, fit for a log line."""
    scheme, colon_slashes, rest = value.partition("://")
    credentials, at, place = rest.rpartition("@")
    if not colon_slashes or not at or ":" not in credentials:
        return value
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}:***@{place}"


def is_address(text: str) -> bool:
    """Whether text is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_origin(text: str) -> bool:
    """Whether text is an origin, as a browser's Origin header gives it."""
    try:
        url = URL(text)
    except ValueError:  # such as a port that is no number
        return False
    host = url.host or ""
    return (
        url.scheme in ("http", "https")
        and host != ""
        and "*" not in host
        and url.path in ("", "/")
        and not url.query_string
        and not url.fragment
        and not url.user
    )


def _field(name: str) -> Any:
    return next(f for f in fields(Settings) if f.name == name)


@functools.cache  # asked for on every request
def _csv(value: str) -> frozenset[str]:
    parts = (p.strip().rstrip("/") for p in value.split(","))
    return frozenset(p for p in parts if p)


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ValueError(
            f"cannot read the config file {path}: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def _convert(f: Any, raw: Any, source: str) -> Any:
    kind = type(f.default)
    try:
        if kind is bool and isinstance(raw, str):
            value: Any = {"true": True, "1": True, "false": False, "0": False}[
                raw.lower()
            ]
        elif (
            kind in (float, int)
            and isinstance(raw, bool)
            or kind is int
            and isinstance(raw, float)
        ):
            raise ValueError
        else:
            value = kind(raw)
    except (TypeError, ValueError, KeyError):
        raise ValueError(
            f"{source}: {raw!r} is not a valid {kind.__name__} for {f.name}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{source}: {f.name} must be a finite number, got {raw!r}")
    if kind in (int, float) and value < 0:
        raise ValueError(f"{source}: {f.name} must not be negative, got {raw!r}")
    bounds, off = f.metadata["bounds"], f.metadata["off"]
    if bounds and value != off and not bounds[0] <= value <= bounds[1]:
        unit = f" {f.metadata['unit']}" if f.metadata["unit"] else ""
        allowed = f"{bounds[0]:.10g} to {bounds[1]:.10g}{unit}"
        if off is not None:
            allowed += f", or {off:.10g} for off"
        raise ValueError(f"{source}: {f.name} must be {allowed}, got {raw!r}")
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ValueError(
            f"{source}: {f.name} must be one of {', '.join(choices)}, got {raw!r}"
        )
    return value
