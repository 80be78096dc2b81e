"""Upkeep of the stores of user data: turns whose process died are marked interrupted,
and messages and finished jobs past their tenant's retention are deleted, at start-up
and then periodically."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from intelligence.contracts import ConversationStore, JobStore

log = logging.getLogger(__name__)


class Upkeep:
    def __init__(
        self, conversations: ConversationStore, jobs: JobStore | None, *, interval_s: float
    ) -> None:
        self._conversations = conversations
        self._jobs = jobs
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> tuple[int, int]:
        """Mark abandoned turns and purge what is past retention; returns how many turns
        were marked and how many messages and jobs were deleted."""
        now = datetime.now(UTC)
        interrupted = await self._conversations.interrupt_abandoned(now)
        purged = await self._conversations.purge_expired(now)
        if self._jobs is not None:
            purged += await self._jobs.purge_expired(now)
        if interrupted:
            log.info("marked %d abandoned turn(s) interrupted", interrupted)
        if purged:
            log.info("deleted %d message(s) and job(s) past their retention", purged)
        return interrupted, purged

    async def start(self) -> None:
        """One pass now (a restarted server shows its predecessor's turns as
        interrupted at once), then one every interval in the background."""
        await self.run_once()
        self._task = asyncio.create_task(self._loop(), name="upkeep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_once()
            except Exception:
                # A store that is briefly down must not end the upkeep for good.
                log.warning("upkeep failed; trying again later", exc_info=True)
