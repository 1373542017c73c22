"""The `vapora` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
import sys
from collections.abc import Sequence

from aiohttp import web

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
        description="Run the server. Every option can also be set as VAPORA_<NAME>.",
    )
    for name in ("host", "port", "db"):
        default = Settings.default(name)
        serve.add_argument(
            f"--{name}",
            type=type(default),
            default=None,
            help=f"{Settings.help(name)} (VAPORA_{name.upper()}, default {default})",
        )
    serve.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
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
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "backup":
        db = args.db or Settings.load({}).db
        try:
            count = backup(db, args.path)
        except (OSError, sqlite3.Error) as error:
            logger.error("Backup failed: %s", error)
            return 1
        logger.info("Copied %s to %s (%d workflows)", db, args.path, count)
    elif args.command == "serve":
        given = {k: v for k, v in vars(args).items() if v is not None}
        try:
            settings = Settings.load(given)
        except ValueError as error:
            parser.error(str(error))
        try:
            asyncio.run(serve(settings))
        except OSError as error:
            logger.error("Cannot start: %s", error)
            return 1
    return 0


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
            "Vapora is serving http://%s:%d/ (database %s)", shown, port, settings.db
        )
    await stop.wait()
    logger.info("Shutting down")
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
