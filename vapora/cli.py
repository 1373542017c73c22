"""The `vapora` command line."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from . import logs
from .backup import backup
from .client import DEFAULT_URL, STATUSES, Api, ApiError, Watcher, check_url
from .database import SQLITE_SCHEME, is_postgresql
from .settings import Settings, hide_password
from .terminal import make_view, printable, summary

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

    add_client_commands(commands)
    return parser


WATCH_EPILOG = """\
exit status:
  0  the workflow is completed
  1  it failed, or it cannot be followed (unknown id, refused, unreachable)
  2  the command line is wrong
  3  it was cancelled
  130  interrupted with Ctrl-C

It keeps following across lost connections and server restarts, resuming where
it left off, until the workflow is completed, failed or cancelled."""


def add_client_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """The commands that talk to a running server through its API."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--url",
        default=None,
        help=f"the server, with any base path (VAPORA_URL, default {DEFAULT_URL})",
    )
    server.add_argument(
        "--token",
        default=None,
        help="the API token (VAPORA_TOKEN, safer: others can see arguments)",
    )
    message = {"metavar": "TEXT", "help": "the workflow's new message"}

    create = commands.add_parser(
        "create",
        parents=[server],
        help="create a workflow and print its id",
        description=(
            "Create a workflow and print its id alone, for ID=$(vapora create ...)."
        ),
    )
    create.add_argument("name", help="the workflow's name")
    create.add_argument("steps", nargs="+", metavar="STEP", help="its steps, in order")
    create.add_argument("-m", "--message", **message)

    advance = commands.add_parser(
        "advance",
        parents=[server],
        help="finish the current step and start the next (or complete)",
    )
    advance.add_argument("workflow_id", metavar="ID", help="the workflow's id")
    advance.add_argument("-m", "--message", **message)

    status = commands.add_parser(
        "status", parents=[server], help="set a workflow's status"
    )
    status.add_argument("workflow_id", metavar="ID", help="the workflow's id")
    status.add_argument(
        "status", choices=STATUSES, metavar="STATUS", help=", ".join(STATUSES)
    )
    status.add_argument("-m", "--message", **message)

    say = commands.add_parser(
        "message", parents=[server], help="replace a workflow's message"
    )
    say.add_argument("workflow_id", metavar="ID", help="the workflow's id")
    say.add_argument("text", help="the new message")

    watch = commands.add_parser(
        "watch",
        parents=[server],
        help="follow a workflow live until it finishes",
        description=(
            "Follow a workflow live: a panel redrawn in place on a terminal, "
            "one line a change otherwise."
        ),
        epilog=WATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watch.add_argument("workflow_id", metavar="ID", help="the workflow's id")


# The options of the API commands, by every name they go by.
CLIENT_OPTIONS = {"--url": "--url", "--token": "--token"}
MESSAGE_OPTIONS = {"-m": "--message", "--message": "--message"}
TAKE_A_MESSAGE = ("create", "advance", "status")


def positionals_apart(argv: list[str]) -> list[str]:
    """Put an API command's options first and every other argument after `--`.

    A workflow id may begin with `-`, and argparse would take it for an option.
    """
    if not argv or argv[0] not in CLIENT_COMMANDS:
        return argv
    known = dict(CLIENT_OPTIONS)
    if argv[0] in TAKE_A_MESSAGE:
        known.update(MESSAGE_OPTIONS)
    options: list[str] = []
    positionals: list[str] = []
    rest = iter(argv[1:])

    for arg in rest:
        name, equals, value = arg.partition("=")
        if arg == "--":
            positionals.extend(rest)
        elif arg in ("-h", "--help"):
            options.append(arg)
        elif name in known and equals:
            options.append(f"{known[name]}={value}")
        elif arg in known:
            following = next(rest, None)
            # Joined with `=`, a value that begins with `-` is still a value.
            joined = f"{known[arg]}={following}"
            options.append(arg if following is None else joined)
        else:
            positionals.append(arg)

    return [argv[0], *options, "--", *positionals]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(
        positionals_apart(list(sys.argv[1:] if argv is None else argv))
    )

    if args.command in CLIENT_COMMANDS:
        return run_client(parser, args)

    if args.command == "backup":
        logs.configure("INFO", "text")
        db = args.db or Settings.load({}).db
        if "://" in db and not db.startswith(SQLITE_SCHEME):
            logger.error(
                "vapora backup copies SQLite files; for %s use the database's own "
                "tools (pg_dump)",
                hide_password(db),
            )
            return 1
        # The same forms as serve: a path, or sqlite:/// before one.
        db = db.removeprefix(SQLITE_SCHEME)
        try:
            count = backup(db, args.path)
        except OSError as error:
            logger.error("Backup failed: %s", error)
            return 1
        except sqlite3.Error as error:
            logger.error("Backup of %s failed: %s", db, error)
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
    except CannotOpenDatabase as error:
        logger.error("Cannot start: --db %s: %s", hide_password(settings.db), error)
        return 1
    except OSError as error:
        logger.error("Cannot start: %s", error)
        return 1
    return 0


class CannotOpenDatabase(Exception):
    """The database named by --db cannot be opened or used; says why."""


def database_problem(db: str, error: BaseException) -> str:
    """Say what is wrong with the --db database, in a line for its operator."""
    if is_postgresql(db):
        return str(error)
    path = Path(db.removeprefix(SQLITE_SCHEME))
    if not path.parent.is_dir():
        return f"the folder {path.parent} does not exist"
    return str(error)


def os_config() -> str | None:
    return os.environ.get("VAPORA_CONFIG") or None


def run_client(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run one API command: 0 on success, 1 with a message on stderr on failure."""
    try:
        url = check_url(args.url or os.environ.get("VAPORA_URL") or DEFAULT_URL)
    except ValueError as error:
        parser.error(str(error))
    token = args.token or os.environ.get("VAPORA_TOKEN") or None
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A name or message the terminal's encoding lacks must not end the command.
        sys.stdout.reconfigure(errors="replace")

    async def call() -> int:
        async with Api(url, token) as api:
            return await CLIENT_COMMANDS[args.command](api, args)

    try:
        return asyncio.run(call())
    except ApiError as error:
        print(f"vapora: {printable(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`vapora watch ... | head`): stop without a trace.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


async def create_command(api: Api, args: argparse.Namespace) -> int:
    progress = await api.create(args.name, args.steps, args.message)
    print(progress.workflow_id)
    return 0


async def advance_command(api: Api, args: argparse.Namespace) -> int:
    print(summary(await api.advance(args.workflow_id, args.message)))
    return 0


async def status_command(api: Api, args: argparse.Namespace) -> int:
    print(summary(await api.set_status(args.workflow_id, args.status, args.message)))
    return 0


async def message_command(api: Api, args: argparse.Namespace) -> int:
    print(summary(await api.set_message(args.workflow_id, args.text)))
    return 0


async def watch_command(api: Api, args: argparse.Namespace) -> int:
    view = make_view(sys.stdout, sys.stderr)
    final = await Watcher(api, args.workflow_id, view).run()
    return WATCH_EXIT_CODES.get(final.status, 1)


WATCH_EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 3}

CLIENT_COMMANDS: dict[str, Callable[[Api, argparse.Namespace], Awaitable[int]]] = {
    "create": create_command,
    "advance": advance_command,
    "status": status_command,
    "message": message_command,
    "watch": watch_command,
}


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then close every socket with 1001 and stop."""
    # Imported here so that the API commands start without loading the server.
    from aiohttp import web
    from asyncpg import PostgresError  # type: ignore[import-untyped]

    from .app import create_app
    from .schema import NewerSchema

    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout_s,
        access_log=None,
    )
    try:
        await runner.setup()
    except (sqlite3.Error, NewerSchema, PostgresError) as error:
        # Opening the store is what start-up does first that can fail this way:
        # a missing folder, a file that is not a database, or a newer schema.
        await runner.cleanup()
        raise CannotOpenDatabase(database_problem(settings.db, error)) from error
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
            hide_password(settings.db),
            settings.read_access,
        )
    logger.debug("Settings: %s", settings.public_items())
    await stop.wait()
    logger.info("Shutting down")
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
