"""The `vapora` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence

from aiohttp import web

from . import logs
from .app import create_app
from .backup import backup
from .settings import Settings

logger = logging.getLogger("vapora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vapora", description="Live progress of workflows in the browser."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the server",
        description=(
            "Run the server. Each setting comes from its flag, else from "
            "VAPORA_<NAME>, else from the --config file, else its default."
        ),
    )
    serve.add_argument(
        "--config", metavar="FILE", help="a TOML file of settings (VAPORA_CONFIG)"
    )
    for f in Settings.declared():
        kind = type(f.default)
        unit = f" in {f.metadata['unit']}" if f.metadata["unit"] else ""
        shown = "" if f.name == "admin_token" else f", default {f.default!r}"
        serve.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=str if kind is bool else kind,
            choices=f.metadata["choices"] or None,
            default=None,
            metavar=None if f.metadata["choices"] else kind.__name__.upper(),
            help=f"{f.metadata['help']}{unit} (VAPORA_{f.name.upper()}{shown})",
        )

    copy = commands.add_parser(
        "backup",
        help="write a consistent copy of a database, even while it is served",
    )
    copy.add_argument("path", help="where to write the copy (must not exist)")
    copy.add_argument(
        "--db",
        default=None,
        help=f"the database to copy (VAPORA_DB, default {Settings.default('db')})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "backup":
        logs.configure("INFO", "text")
        db = args.db or Settings.load({}).db
        try:
            count = backup(db, args.path)
        except (OSError, sqlite3.Error) as error:
            logger.error("Backup failed: %s", error)
            return 1
        logger.info("Copied %s to %s (%d workflows)", db, args.path, count)
        return 0

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = args.config or os_config()
    try:
        settings = Settings.load(given, config=config)
    except ValueError as error:
        parser.error(str(error))
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except OSError as error:
        logger.error("Cannot start: %s", error)
        return 1
    return 0


def os_config() -> str | None:
    return os.environ.get("VAPORA_CONFIG") or None


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then close every socket with 1001 and stop."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_s,
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    for address in runner.addresses:
        host, port = address[0], address[1]
        shown = f"[{host}]" if ":" in host else host
        logger.info(
            "Vapora is serving http://%s:%d%s/ (database %s, reading %s)",
            shown,
            port,
            settings.base_path,
            settings.db,
            settings.read_access,
        )
    logger.debug("Settings: %s", settings.public_items())
    await stop.wait()
    logger.info("Shutting down")
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
