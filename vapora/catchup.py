"""What a new or returning subscriber is sent before the live stream.

Shared by every transport: a snapshot for a new subscriber, the events it missed
for one that resumes from a seq, or a fresh snapshot marked `resync` when the
missed events cannot be served (another database, pruned or too long a gap).
"""

from __future__ import annotations

from typing import Any

from .frames import Encoded, frame_text
from .model import Workflow, to_json, utc_now
from .store import Store

HISTORY_IN_SNAPSHOT = 50  # as many as the page shows


def workflow_json(workflow: Workflow, history: bool = True) -> str:
    if not history and workflow.encoded_state is not None:
        return workflow.encoded_state
    state: dict[str, Any] = workflow.state()
    if history:
        state["history"] = [e.as_dict() for e in workflow.history]
    return to_json(state)


async def snapshot(store: Store, workflow_id: str, reason: str) -> Encoded:
    """Return a snapshot frame of the workflow as stored now."""
    workflow = await store.get_workflow(workflow_id, history=HISTORY_IN_SNAPSHOT)
    text = frame_text(
        "snapshot", store.epoch, workflow_json(workflow), reason=reason, now=utc_now()
    )
    return Encoded("snapshot", workflow.seq, text.encode())


async def opening_frames(
    store: Store,
    workflow_id: str,
    after: int | None,
    client_epoch: str | None,
    max_resume_events: int,
) -> list[Encoded]:
    """Return the frames to send first, oldest first."""
    if after is None:
        return [await snapshot(store, workflow_id, "connect")]
    if client_epoch != store.epoch:
        return [await snapshot(store, workflow_id, "resync")]

    current = await store.get_workflow(workflow_id)
    events = await store.events_after(workflow_id, after, max_resume_events + 1)
    missing = current.seq - after
    complete = (
        0 <= missing <= max_resume_events
        and len(events) >= missing
        and (missing == 0 or events[0][0] == after + 1)
    )
    if not complete:
        return [await snapshot(store, workflow_id, "resync")]
    return [
        Encoded("update", seq, frame_text("update", store.epoch, payload).encode())
        for seq, payload in events
    ]


async def list_snapshot(store: Store, limit: int) -> Encoded:
    workflows = await store.list_workflows(limit)
    body = ",".join(workflow_json(w, history=False) for w in workflows)
    text = frame_text(
        "list", store.epoch, '{"workflows":[' + body + "]}", now=utc_now()
    )
    return Encoded("list", None, text.encode())


def ready_frame(epoch: str, seq: int, heartbeat_s: float) -> Encoded:
    """The frame that ends a catch-up: from here on, the stream is live.

    It says how often heartbeats come, so a client can tell silence from death.
    """
    shown = seq if seq >= 0 else None
    text = frame_text(
        "ready", epoch, "{}", seq=shown, now=utc_now(), heartbeat_s=heartbeat_s
    )
    return Encoded("ready", shown, text.encode())
