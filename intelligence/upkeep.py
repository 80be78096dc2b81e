"""Conversation upkeep: turns whose process died are marked interrupted, and messages
past their tenant's retention are deleted, at start-up and then periodically."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from intelligence.contracts import ConversationStore

log = logging.getLogger(__name__)


class ConversationUpkeep:
    def __init__(self, store: ConversationStore, *, interval_s: float) -> None:
        self._store = store
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> tuple[int, int]:
        """Mark abandoned turns and purge expired messages; returns both counts."""
        now = datetime.now(UTC)
        interrupted = await self._store.interrupt_abandoned(now)
        purged = await self._store.purge_expired(now)
        if interrupted:
            log.info("marked %d abandoned turn(s) interrupted", interrupted)
        if purged:
            log.info("deleted %d message(s) past their retention", purged)
        return interrupted, purged

    async def start(self) -> None:
        """One pass now (a restarted server shows its predecessor's turns as
        interrupted at once), then one every interval in the background."""
        await self.run_once()
        self._task = asyncio.create_task(self._loop(), name="conversation-upkeep")

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
                log.warning("conversation upkeep failed; trying again later", exc_info=True)
