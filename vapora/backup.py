"""Online backup: a consistent copy of a live database, taken while it serves."""

from __future__ import annotations

import os
import secrets
import sqlite3
from pathlib import Path

from .store import BUSY_TIMEOUT_MS


def backup(db: str | Path, target: str | Path) -> int:
    """Copy db to target through SQLite's backup API; return the workflows copied.

    The copy is written beside the target and renamed into place, so a target
    never holds a half-written file. Raises FileExistsError if target exists.
    """
    db, target = Path(db), Path(target)
    if not db.is_file():
        raise FileNotFoundError(f"no database at {db}")
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose a new name")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"no folder {target.parent} to write {target.name} in")
    partial = target.with_name(target.name + ".partial")
    # As a URI, a path may hold any character, such as ? or #.
    source = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    source.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    copy = sqlite3.connect(partial)
    copied = False
    try:
        # One step copies every page under one read transaction: a consistent
        # snapshot, while writers go on in WAL mode.
        source.backup(copy, pages=-1)
        # Once restored, the copy's history parts from the original's: a new
        # epoch tells resuming clients not to trust seqs they got elsewhere.
        with copy:
            copy.execute(
                "UPDATE meta SET value = ? WHERE key = 'epoch'", (secrets.token_hex(8),)
            )
        copy.execute("PRAGMA journal_mode = DELETE")
        (count,) = copy.execute("SELECT count(*) FROM workflows").fetchone()
        copied = True
    finally:
        copy.close()
        source.close()
        if not copied:
            partial.unlink(missing_ok=True)
    os.replace(partial, target)
    return int(count)
