"""Workflows, their steps and the rules every change must follow."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from .errors import InvalidInput, RuleViolation


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES

    @property
    def label(self) -> str:
        return STATUS_LABELS[self]


FINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

STATUS_LABELS = {
    Status.PENDING: "Pending",
    Status.RUNNING: "Running",
    Status.WAITING: "Waiting for a person",
    Status.PAUSED: "Paused",
    Status.COMPLETED: "Completed",
    Status.FAILED: "Failed",
    Status.CANCELLED: "Cancelled",
}


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


MAX_NAME_CHARS = 200
MAX_STEP_NAME_CHARS = 200
MAX_MESSAGE_CHARS = 2000
MAX_STEPS = 200


def utc_now() -> str:
    """Return the current time as UTC ISO-8601 with an explicit offset."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc" and ch not in "\n\t":
            raise InvalidInput(
                field_name, f"{field_name} contains a control character U+{ord(ch):04X}"
            )
        if category == "Cs":
            raise InvalidInput(
                field_name,
                f"{field_name} contains an unpaired surrogate U+{ord(ch):04X}",
            )
    return text


def clean_steps(value: Any) -> list[str]:
    """Check a list of step names, or a text with one step per line."""
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip()]
    if not isinstance(value, list):
        raise InvalidInput("steps", "steps must be a list of step names")
    if not value:
        raise InvalidInput("steps", "a workflow needs at least one step")
    if len(value) > MAX_STEPS:
        raise InvalidInput("steps", f"{len(value)} steps; the limit is {MAX_STEPS}")
    names = [clean_text(v, "steps", MAX_STEP_NAME_CHARS, required=True) for v in value]
    for name in names:
        if "\n" in name:
            raise InvalidInput("steps", "a step name must be a single line")
    return names


def clean_status(value: Any) -> Status:
    try:
        return Status(value)
    except ValueError:
        allowed = ", ".join(s.value for s in Status)
        raise InvalidInput("status", f"status must be one of: {allowed}") from None


@dataclass(slots=True)
class Step:
    name: str
    state: StepState = StepState.PENDING
    started_at: str | None = None
    finished_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        return cls(
            data["name"],
            StepState(data["state"]),
            data["started_at"],
            data["finished_at"],
        )


@dataclass(slots=True)
class Workflow:
    id: str
    name: str
    status: Status
    current_step: int
    steps: list[Step]
    message: str
    created_at: str
    updated_at: str
    seq: int
    history: list[Event] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @property
    def steps_done(self) -> int:
        return sum(1 for s in self.steps if s.state is StepState.DONE)

    @property
    def percent(self) -> int:
        if self.status is Status.COMPLETED:
            return 100
        return round(100 * self.steps_done / self.total_steps)

    @property
    def step_label(self) -> str:
        if self.current_step == 0:
            return f"Not started · {self.total_steps} steps"
        return f"Step {self.current_step} of {self.total_steps}"

    @property
    def current_step_name(self) -> str | None:
        if 1 <= self.current_step <= self.total_steps:
            return self.steps[self.current_step - 1].name
        return None

    def state(self) -> dict[str, Any]:
        """The state every frame and API answer carries."""
        return {
            "workflow_id": self.id,
            "name": self.name,
            "status": self.status.value,
            "status_label": self.status.label,
            "current_step": self.current_step,
            "total_steps": self.total_steps,
            "percent": self.percent,
            "step_label": self.step_label,
            "message": self.message,
            "steps": [s.as_dict() for s in self.steps],
            "created_at": self.created_at,
            "timestamp": self.updated_at,
            "seq": self.seq,
        }

    # The rules. Each method changes the workflow in memory and returns the
    # event kind; the store persists the result in one transaction.

    def advance(self, now: str) -> str:
        self._refuse_if_final("advance")
        if self.current_step >= 1:
            step = self.steps[self.current_step - 1]
            step.state = StepState.DONE
            step.finished_at = now
        if self.current_step == self.total_steps:
            self.status = Status.COMPLETED
            return "completed"
        self.current_step += 1
        self._start_current(now)
        self.status = Status.RUNNING
        return "advanced"

    def set_status(self, status: Status, now: str) -> str:
        if status is self.status:
            return "status"
        self._refuse_if_final("change the status of")
        if status is Status.PENDING:
            raise RuleViolation(
                "status",
                "a started workflow cannot go back to pending; reset it instead",
            )
        if self.current_step == 0:
            self.current_step = 1
            self._start_current(now)
        current = self.steps[self.current_step - 1]
        if status is Status.COMPLETED:
            if current.state is StepState.RUNNING:
                current.state = StepState.DONE
                current.finished_at = now
            for step in self.steps[self.current_step :]:
                step.state = StepState.SKIPPED
        elif status in (Status.FAILED, Status.CANCELLED):
            if current.state is StepState.RUNNING:
                current.state = StepState(status.value)
                current.finished_at = now
        self.status = status
        return "status"

    def reopen(self, now: str) -> str:
        if not self.status.is_final:
            raise RuleViolation(
                "status", f"workflow is {self.status.value}, not finished"
            )
        for step in self.steps:
            if step.state is StepState.SKIPPED:
                step.state = StepState.PENDING
        current = self.steps[self.current_step - 1]
        current.state = StepState.RUNNING
        current.finished_at = None
        self.status = Status.RUNNING
        return "reopened"

    def reset(self) -> str:
        for step in self.steps:
            step.state = StepState.PENDING
            step.started_at = None
            step.finished_at = None
        self.current_step = 0
        self.status = Status.PENDING
        return "reset"

    def _start_current(self, now: str) -> None:
        step = self.steps[self.current_step - 1]
        step.state = StepState.RUNNING
        step.started_at = now
        step.finished_at = None

    def _refuse_if_final(self, action: str) -> None:
        if self.status.is_final:
            raise RuleViolation(
                "status",
                f"cannot {action} a {self.status.value} workflow; reopen it first",
            )


@dataclass(slots=True, frozen=True)
class Event:
    workflow_id: str
    seq: int
    kind: str
    actor: str
    at: str
    summary: str


def summarize(kind: str, wf: Workflow, message_changed: bool) -> str:
    """Describe a change in a few words for the history."""
    if kind == "created":
        text = f"Created with {wf.total_steps} steps"
    elif kind == "advanced":
        text = f"Step {wf.current_step} of {wf.total_steps}: {wf.current_step_name}"
    elif kind == "completed":
        text = "Completed"
    elif kind == "status":
        text = f"Status: {wf.status.label}"
    elif kind == "reopened":
        text = "Reopened"
    elif kind == "reset":
        text = "Reset to the start"
    else:
        text = "Message"
    if message_changed and wf.message and kind != "message":
        text += f" — {wf.message}"
    elif kind == "message":
        text = f"Message: {wf.message}" if wf.message else "Message cleared"
    return text
