"""How the command line shows a workflow: one plain line a change, or a live panel.

Text from the server (names, messages) is never written raw: control characters
could move the cursor or rewrite the screen, so they are replaced first.
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from typing import TextIO

from .client import Progress, View

MARKERS = {
    "done": "✓",
    "running": "▶",
    "pending": "·",
    "failed": "✗",
    "skipped": "–",
    "cancelled": "–",
}
BAR_WIDTH = 20
# Lines of the panel above the steps: name, bar, message; and one for a note.
PANEL_LINES = 4
# Characters that reorder what follows them on screen.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """Return text on one line, without control characters."""
    one_line = " ".join(text.split())
    return "".join(
        "?" if unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS else ch
        for ch in one_line
    )


def step_label(progress: Progress) -> str:
    """`Step 2 of 3`, or `Not started · 3 steps` before the first step."""
    if progress.current_step == 0:
        return f"Not started · {progress.total_steps} steps"
    return f"Step {progress.current_step} of {progress.total_steps}"


def summary(progress: Progress) -> str:
    """One line such as `Deploy: Step 2 of 3 (running) — Building the image`."""
    status = printable(progress.status)
    line = f"{printable(progress.name)}: {step_label(progress)} ({status})"
    if progress.message:
        line += f" — {printable(progress.message)}"
    return line


def progress_bar(percent: int, width: int = BAR_WIDTH) -> str:
    """`[########------------] 40%`."""
    filled = round(width * max(0, min(percent, 100)) / 100)
    return f"[{'#' * filled}{'-' * (width - filled)}] {percent}%"


def display_width(ch: str) -> int:
    """How many columns a character takes: 0 when combining, 2 when wide."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def fit(text: str, width: int) -> str:
    """Cut text to `width` columns, so that no line wraps and the redraw stays put."""
    if sum(display_width(ch) for ch in text) <= width:
        return text
    kept, used = [], 0
    for ch in text:
        used += display_width(ch)
        if used > width - 1:
            break
        kept.append(ch)
    return "".join(kept) + "…"


def step_lines(progress: Progress, room: int) -> list[str]:
    """The step list, or a window of it around the current step when it is long."""
    lines = [
        f"  {MARKERS.get(step.state, '?')} {printable(step.name)}"
        for step in progress.steps
    ]
    if len(lines) <= room:
        return lines

    room = max(room - 2, 1)
    centre = max(progress.current_step - 1, 0)
    start = min(max(centre - room // 2, 0), len(lines) - room)
    end = start + room
    shown = lines[start:end]
    if start:
        shown.insert(0, f"  … {start} more")
    if end < len(lines):
        shown.append(f"  … {len(lines) - end} more")
    return shown


def panel(progress: Progress, note: str, columns: int, rows: int) -> list[str]:
    """The lines of the live panel, each fitted to the terminal's width."""
    lines = [
        printable(progress.name),
        f"{progress_bar(progress.percent)}  {step_label(progress)}  "
        + printable(progress.status),
    ]
    if progress.message:
        lines.append(printable(progress.message))
    lines.extend(step_lines(progress, rows - PANEL_LINES - 1))
    if note:
        lines.append(f"({note})")
    return [fit(line, columns - 1) for line in lines]


class LineView:
    """One plain line for each change, for logs and pipes; connection news on err."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.last_line = ""
        self.lost_link = False

    def show(self, progress: Progress) -> None:
        line = summary(progress)
        if line != self.last_line:
            print(line, file=self.out, flush=True)
            self.last_line = line

    def live(self) -> None:
        if self.lost_link:
            print("vapora: following again", file=self.err, flush=True)
            self.lost_link = False

    def lost(self, reason: str) -> None:
        if not self.lost_link:
            note = f"vapora: {printable(reason)}; reconnecting"
            print(note, file=self.err, flush=True)
            self.lost_link = True


class LiveView:
    """A panel redrawn in place: bar, step, status, message, steps, link state."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.progress: Progress | None = None
        self.note = ""
        self.drawn = 0

    def show(self, progress: Progress) -> None:
        self.progress = progress
        self.draw()

    def live(self) -> None:
        self.note = ""
        self.draw()

    def lost(self, reason: str) -> None:
        self.note = f"{printable(reason)}; reconnecting"
        self.draw()

    def draw(self) -> None:
        if self.progress is None:
            return
        columns, rows = shutil.get_terminal_size()
        lines = panel(self.progress, self.note, columns, rows)
        # Back to the panel's first line, then clear everything below it.
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "\x1b[J" + "\n".join(lines) + "\n")
        self.out.flush()
        self.drawn = len(lines)


def make_view(out: TextIO, err: TextIO) -> View:
    """The live panel on a terminal that can move its cursor, plain lines elsewhere."""
    if out.isatty() and os.environ.get("TERM") != "dumb":
        return LiveView(out)
    return LineView(out, err)
