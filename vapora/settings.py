"""Settings, declared once: name, type, default, environment variable and help."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8080, "TCP port to listen on (0 picks a free one)")
    db: str = setting("./vapora.db", "SQLite database file")
    admin_token: str = setting(
        "", "admin token; when empty, one is generated at first start and logged once"
    )
    heartbeat_s: float = setting(20.0, "seconds between server pings on each socket")
    max_queue_bytes: int = setting(
        64 * 1024, "bytes queued for one socket before it gets the latest state instead"
    )
    stuck_timeout_s: float = setting(
        30.0, "seconds a socket may stay unable to take data before it is closed"
    )
    max_resume_events: int = setting(
        1000, "most missed events replayed on resume; past that, a fresh snapshot"
    )
    max_incoming_bytes: int = setting(4096, "largest frame a client may send")
    read_access: str = setting(
        "public",
        "who may read workflows: public (anyone with the URL) or private "
        "(signed-in admins, read tokens and share links)",
    )
    allowed_origins: str = setting(
        "", "comma-separated origins, besides this server's, that may open sockets"
    )
    max_body_bytes: int = setting(64 * 1024, "largest request body accepted")
    max_connections_per_address: int = setting(
        64, "most open sockets and event streams from one client address"
    )
    session_hours: float = setting(12.0, "hours an admin sign-in lasts")
    shutdown_timeout_s: float = setting(3.0, "seconds to finish requests on shutdown")

    @property
    def origins(self) -> frozenset[str]:
        parts = (o.strip().rstrip("/") for o in self.allowed_origins.split(","))
        return frozenset(p for p in parts if p)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def help(cls, name: str) -> str:
        return str(next(f for f in fields(cls) if f.name == name).metadata["help"])

    @classmethod
    def default(cls, name: str) -> Any:
        return next(f for f in fields(cls) if f.name == name).default

    @classmethod
    def load(
        cls,
        given: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from given values, then VAPORA_* variables, then defaults.

        Raises ValueError naming the setting and the value when one is wrong.
        """
        given = given or {}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = given.get(f.name)
            source = f"--{f.name.replace('_', '-')}"
            if raw is None:
                env_name = "VAPORA_" + f.name.upper()
                raw = environ.get(env_name)
                source = env_name
            if raw is None:
                continue
            values[f.name] = _convert(f.name, type(f.default), raw, source)
        return cls(**values)


def _convert(name: str, kind: type, raw: Any, source: str) -> Any:
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ValueError(
            f"{source}: {raw!r} is not a valid {kind.__name__} for {name}"
        ) from None
    if kind in (int, float) and value < 0:
        raise ValueError(f"{source}: {name} must not be negative, got {raw!r}")
    if name == "read_access" and value not in ("public", "private"):
        raise ValueError(f"{source}: read_access is public or private, not {raw!r}")
    if name == "port" and not 0 <= value <= 65535:
        raise ValueError(f"{source}: port must be 0 to 65535, got {raw!r}")
    return value
