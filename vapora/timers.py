"""Time-driven changes: gates whose timeout decides, workflows that stall."""

from __future__ import annotations

import asyncio
import logging

from .model import utc_now
from .store import Store

logger = logging.getLogger(__name__)


async def run_timers(store: Store, interval_s: float) -> None:
    """Every interval_s, decide overdue gates and flag overdue workflows."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await fire_due(store)
        except Exception:
            logger.exception("Checking gate timeouts and stalls failed")


async def fire_due(store: Store) -> None:
    gates, stalls = await store.due(utc_now())
    for workflow_id in gates:
        await store.expire_gate(workflow_id)
    for workflow_id in stalls:
        await store.mark_stalled(workflow_id)
