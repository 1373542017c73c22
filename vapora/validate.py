"""Checks on what callers send: text, step lists, statuses and gates."""

from __future__ import annotations

import re
from typing import Any

from .errors import InvalidInput
from .model import MAX_NAME_CHARS, MAX_STEP_NAME_CHARS, MAX_STEPS, Gate, Status, Step

GATE_MARK = "[gate]"
# Control characters (category Cc) but tab and newline, and lone surrogates.
FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_APPROVERS = 20
# The longest a gate may wait for its answer (far enough below what a date can
# hold), and the longest a workflow may be expected to stay silent.
MAX_GATE_TIMEOUT_S = 366 * 24 * 3600.0
MAX_STALL_AFTER_S = 7 * 24 * 3600.0
STEP_SHAPE = "each of the steps must be a name or an object with a name"


def parse_count(raw: str, maximum: int) -> int | None:
    """Read ASCII digits as a whole number up to maximum; None for anything else.

    str.isdigit() also takes digits such as '²' that int() refuses, and a long
    enough string of digits costs a lot to convert: both are checked first.
    """
    if not raw.isascii() or not raw.isdigit():
        return None
    if len(raw.lstrip("0")) > len(str(maximum)):
        return None
    value = int(raw)
    return value if value <= maximum else None


def excerpt(raw: str, max_chars: int = 20) -> str:
    """Quote the start of a bad value for a message, never all of a long one."""
    return repr(raw if len(raw) <= max_chars else raw[:max_chars] + "...")


def clean_text(value: Any, field_name: str, max_chars: int, required: bool) -> str:
    """Check a piece of user text; raise InvalidInput naming the field."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidInput(field_name, f"{field_name} must be a string")
    text: str = value.strip()
    if required and not text:
        raise InvalidInput(field_name, f"{field_name} is required")
    if len(text) > max_chars:
        raise InvalidInput(
            field_name,
            f"{field_name} is {len(text)} characters; the limit is {max_chars}",
        )
    bad = FORBIDDEN.search(text)
    if bad:
        ch = bad.group()
        what = (
            "an unpaired surrogate"
            if "\ud800" <= ch <= "\udfff"
            else "a control character"
        )
        raise InvalidInput(field_name, f"{field_name} contains {what} U+{ord(ch):04X}")
    return text


def clean_steps(value: Any) -> list[Step]:
    """Check the steps: names, or objects with a name and an optional gate.

    A text gives one step a line. A name ending in [gate] waits for a person.
    """
    if isinstance(value, str):
        value = [_step_from_line(line) for line in value.splitlines() if line.strip()]
    if not isinstance(value, list):
        raise InvalidInput("steps", "steps must be a list of step names")
    if not value:
        raise InvalidInput("steps", "a workflow needs at least one step")
    if len(value) > MAX_STEPS:
        raise InvalidInput("steps", f"{len(value)} steps; the limit is {MAX_STEPS}")
    return [_clean_step(item) for item in value]


def _step_from_line(line: str) -> Any:
    text = line.strip()
    if text.lower().endswith(GATE_MARK):
        return {"name": text[: -len(GATE_MARK)], "gate": True}
    return text


def _clean_step(item: Any) -> Step:
    if isinstance(item, str):
        item = _step_from_line(item)
    if isinstance(item, str):
        return Step(_step_name(item))
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidInput("steps", f"{STEP_SHAPE}, got {_kind(item)}")
    unknown = set(item) - {"name", "gate"}
    if unknown:
        raise InvalidInput("steps", f"unknown step field {sorted(unknown)[0]!r}")
    return Step(_step_name(item["name"]), gate=clean_gate(item.get("gate")))


def _kind(item: Any) -> str:
    """Name a JSON value's kind, for a message."""
    if item is None:
        return "null"
    if isinstance(item, bool):
        return "true or false"
    if isinstance(item, int | float):
        return "a number"
    if isinstance(item, dict):
        has = "a name that is not a string" if "name" in item else "no name"
        return f"an object with {has}"
    return "a list" if isinstance(item, list) else type(item).__name__


def _step_name(value: str) -> str:
    name = clean_text(value, "steps", MAX_STEP_NAME_CHARS, required=False)
    if not name:
        raise InvalidInput("steps", "each of the steps needs a name; one is empty")
    if "\n" in name:
        raise InvalidInput("steps", "a step name must be a single line")
    return name


def clean_gate(value: Any) -> Gate | None:
    """Check a step's gate: true, or {approvers?, timeout_s?, on_timeout?}."""
    if value is None or value is False:
        return None
    if value is True:
        return Gate()
    if not isinstance(value, dict):
        raise InvalidInput("gate", "gate must be true or an object")
    unknown = set(value) - {"approvers", "timeout_s", "on_timeout"}
    if unknown:
        raise InvalidInput("gate", f"unknown gate field {sorted(unknown)[0]!r}")
    approvers = value.get("approvers", [])
    if not isinstance(approvers, list) or len(approvers) > MAX_APPROVERS:
        raise InvalidInput(
            "approvers", f"approvers must be a list of at most {MAX_APPROVERS} names"
        )
    names = [
        clean_text(a, "approvers", MAX_NAME_CHARS, required=True) for a in approvers
    ]
    timeout = value.get("timeout_s")
    # NaN fails every comparison, so the range check refuses it too.
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_GATE_TIMEOUT_S
    ):
        raise InvalidInput(
            "timeout_s",
            "timeout_s must be a number of seconds above 0 and at most 366 days "
            f"({MAX_GATE_TIMEOUT_S:.0f})",
        )
    on_timeout = value.get("on_timeout", "reject")
    if on_timeout not in ("approve", "reject"):
        raise InvalidInput("on_timeout", "on_timeout must be approve or reject")
    return Gate(names, None if timeout is None else float(timeout), on_timeout)


def clean_decision(value: Any) -> str:
    if value not in ("approve", "reject"):
        raise InvalidInput("decision", "decision must be approve or reject")
    return str(value)


def clean_status(value: Any) -> Status:
    try:
        return Status(value)
    except ValueError:
        allowed = ", ".join(s.value for s in Status)
        raise InvalidInput("status", f"status must be one of: {allowed}") from None


def clean_stall_after(value: Any) -> float | None:
    """Check a workflow's expected interval between changes, in seconds."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput("stall_after_s", "stall_after_s must be a number") from None
    if isinstance(value, bool) or not 1 <= seconds <= MAX_STALL_AFTER_S:
        raise InvalidInput("stall_after_s", "stall_after_s must be 1 s to 7 days")
    return seconds
