"""Workflows, their steps and the rules every change must follow."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from .errors import RuleViolation


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
STALL_FLOOR_S = 10.0


# Made once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def to_json(value: Any) -> str:
    """Encode value as compact JSON text, the form every stored and sent text has."""
    return _ENCODER.encode(value)


def utc_now() -> str:
    """Return the current time as UTC ISO-8601 with an explicit offset."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class Gate:
    """A step that waits for a person: who may answer, and what silence means."""

    approvers: list[str] = field(default_factory=list)
    timeout_s: float | None = None
    on_timeout: str = "reject"
    decision: str | None = None  # "approved" or "rejected", once answered
    decided_by: str | None = None
    decided_at: str | None = None
    comment: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "approvers": self.approvers,
            "timeout_s": self.timeout_s,
            "on_timeout": self.on_timeout,
            "decision": self.decision,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "comment": self.comment,
        }

    @property
    def who(self) -> str:
        """Say who may answer, for people."""
        if not self.approvers:
            return "an admin"
        return ", ".join(self.approvers) + " or an admin"


@dataclass(slots=True)
class Step:
    name: str
    state: StepState = StepState.PENDING
    started_at: str | None = None
    finished_at: str | None = None
    gate: Gate | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "state": self.state.value,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.gate is not None:
            data["gate"] = self.gate.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        gate = data.get("gate")
        return cls(
            data["name"],
            StepState(data["state"]),
            data["started_at"],
            data["finished_at"],
            Gate(**gate) if gate else None,
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
    stall_after_s: float | None = None
    stalled: bool = False
    history: list[Event] = field(default_factory=list)
    # state() as JSON, set by the store as it saves a change, so that the answer
    # to the change does not encode it again. No rule runs after that.
    encoded_state: str | None = field(default=None, repr=False, compare=False)

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
            plural = "" if self.total_steps == 1 else "s"
            return f"Not started · {self.total_steps} step{plural}"
        return f"Step {self.current_step} of {self.total_steps}"

    @property
    def open_gate(self) -> Gate | None:
        """The gate of the current step while it waits for an answer."""
        if not 1 <= self.current_step <= self.total_steps:
            return None
        gate = self.steps[self.current_step - 1].gate
        if gate is None or gate.decision is not None or self.status.is_final:
            return None
        if self.steps[self.current_step - 1].state is not StepState.RUNNING:
            return None
        return gate

    @property
    def gate_deadline(self) -> str | None:
        gate = self.open_gate
        started = self.steps[self.current_step - 1].started_at
        if gate is None or gate.timeout_s is None or started is None:
            return None
        deadline = datetime.fromisoformat(started) + timedelta(seconds=gate.timeout_s)
        return deadline.isoformat(timespec="milliseconds")

    @property
    def stall_interval_s(self) -> float | None:
        """How long silence may last before the workflow counts as stalled.

        Set per workflow, or else learned from its own finished steps: three
        times the longest of them, and never under STALL_FLOOR_S.
        """
        if self.stall_after_s:
            return self.stall_after_s
        durations = [
            (
                datetime.fromisoformat(s.finished_at)
                - datetime.fromisoformat(s.started_at)
            ).total_seconds()
            for s in self.steps
            if s.state is StepState.DONE and s.started_at and s.finished_at
        ]
        if not durations:
            return None
        return max(STALL_FLOOR_S, 3 * max(durations))

    @property
    def stall_at(self) -> str | None:
        interval = self.stall_interval_s
        if self.status is not Status.RUNNING or self.stalled or interval is None:
            return None
        at = datetime.fromisoformat(self.updated_at) + timedelta(seconds=interval)
        return at.isoformat(timespec="milliseconds")

    @property
    def badge(self) -> tuple[str, str]:
        """The status as a person sees it: (data-status value, label)."""
        if self.stalled and self.status is Status.RUNNING:
            return "stalled", "Stalled"
        return self.status.value, self.status.label

    @property
    def current_step_name(self) -> str | None:
        if 1 <= self.current_step <= self.total_steps:
            return self.steps[self.current_step - 1].name
        return None

    def state(self) -> dict[str, Any]:
        """The state every frame and API answer carries."""
        badge_status, badge_label = self.badge
        return {
            "workflow_id": self.id,
            "name": self.name,
            "status": self.status.value,
            "status_label": self.status.label,
            "badge_status": badge_status,
            "badge_label": badge_label,
            "stalled": self.stalled,
            "stall_after_s": self.stall_after_s,
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
        if self.open_gate is not None:
            raise RuleViolation(
                "gate",
                f"step {self.current_step} waits for a person: approve or reject it",
            )
        return self._next_step(now)

    def answer_gate(self, decision: str, by: str, comment: str, now: str) -> str:
        """Record a person's answer to the open gate; approving moves on."""
        gate = self.open_gate
        if gate is None:
            raise RuleViolation("gate", "no step is waiting for an answer")
        gate.decision = "approved" if decision == "approve" else "rejected"
        gate.decided_by = by
        gate.decided_at = now
        gate.comment = comment
        if decision == "approve":
            self._next_step(now)
            return "approved"
        step = self.steps[self.current_step - 1]
        step.state = StepState.FAILED
        step.finished_at = now
        self.status = Status.FAILED
        return "rejected"

    def _next_step(self, now: str) -> str:
        if self.current_step >= 1:
            step = self.steps[self.current_step - 1]
            step.state = StepState.DONE
            step.finished_at = now
        if self.current_step == self.total_steps:
            self.status = Status.COMPLETED
            return "completed"
        self.current_step += 1
        self._start_current(now)
        gated = self.steps[self.current_step - 1].gate is not None
        self.status = Status.WAITING if gated else Status.RUNNING
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
        if status is Status.RUNNING and self.open_gate is not None:
            raise RuleViolation(
                "status",
                f"step {self.current_step} waits for a person: approve or reject it",
            )
        if status is Status.COMPLETED and (gated := self._unanswered_gate()):
            raise RuleViolation(
                "status",
                f"step {gated} needs a person's approval first: approve or reject "
                "it, or cancel the workflow",
            )
        if self.current_step == 0:
            self.current_step = 1
            self._start_current(now)
            if status is Status.RUNNING and self.open_gate is not None:
                status = Status.WAITING  # starting at a gate is waiting for it
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

    def reopen(self, now: str, status: Status = Status.RUNNING) -> str:
        """Bring a finished workflow back at its step, with status."""
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
        if current.gate is not None and current.gate.decision == "rejected":
            gate = current.gate
            current.gate = Gate(gate.approvers, gate.timeout_s, gate.on_timeout)
        if current.gate is not None and current.gate.decision is None:
            # The wait, and so its timeout, starts again.
            current.started_at = now
        self.status = Status.RUNNING
        if self.open_gate is not None:
            # Back at a gate, "running" means waiting for its answer again.
            self.status = Status.WAITING
        if status is not Status.RUNNING or self.open_gate is None:
            self.set_status(status, now)
        return "reopened"

    def reset(self) -> str:
        for step in self.steps:
            step.state = StepState.PENDING
            step.started_at = None
            step.finished_at = None
            if step.gate is not None:
                step.gate = Gate(
                    step.gate.approvers, step.gate.timeout_s, step.gate.on_timeout
                )
        self.current_step = 0
        self.status = Status.PENDING
        return "reset"

    def _unanswered_gate(self) -> int | None:
        """The first step, from the current one on, whose gate has no answer."""
        for number in range(max(self.current_step, 1), self.total_steps + 1):
            gate = self.steps[number - 1].gate
            if gate is not None and gate.decision is None:
                return number
        return None

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

    def as_dict(self) -> dict[str, Any]:
        """The event as the history lists it, without its workflow's id."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "actor": self.actor,
            "at": self.at,
            "summary": self.summary,
        }


def summarize(kind: str, wf: Workflow, message_changed: bool) -> str:
    """Describe a change in a few words for the history."""
    if kind == "created":
        plural = "" if wf.total_steps == 1 else "s"
        text = f"Created with {wf.total_steps} step{plural}"
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
    elif kind in ("approved", "rejected"):
        gate = next(s.gate for s in reversed(wf.steps) if s.gate and s.gate.decided_by)
        text = f"{kind.capitalize()} by {gate.decided_by}: {gate.comment}"
    elif kind == "stalled":
        text = "Stalled: no news for longer than expected"
    else:
        text = "Message"
    if message_changed and wf.message and kind != "message":
        text += f" — {wf.message}"
    elif kind == "message":
        text = f"Message: {wf.message}" if wf.message else "Message cleared"
    return text
