"""A write of a SQLite store cancelled part-way (a turn's heartbeat stopped as the turn
ends) must not leave the store's one shared connection inside a transaction: every
later write would fail with "cannot start a transaction within a transaction"."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from intelligence.contracts import MessageStatus, Principal
from intelligence.stores.sqlite import SqliteConversationStore
from tests.intelligence.stores.conversation_contract import new_turn
from tests.support.lifecycle import opened

ALICE = Principal("contoso", "alice")


async def test_a_write_cancelled_while_it_begins_leaves_the_store_writable(
    tmp_path: Path,
) -> None:
    async with opened(SqliteConversationStore(tmp_path / "c.db")) as store:
        record = await store.begin_turn(ALICE, new_turn())
        assert record.attempt is not None
        renewal = asyncio.create_task(
            store.renew_turn(
                ALICE,
                record.reply.id,
                "partial",
                datetime.now(UTC) + timedelta(seconds=30),
                attempt=record.attempt,
            )
        )
        await asyncio.sleep(0)  # the renewal now awaits its BEGIN on the connection's thread
        renewal.cancel()
        with pytest.raises(asyncio.CancelledError):
            await renewal

        assert await store.finish_message(
            ALICE, record.reply.id, "The answer.", MessageStatus.COMPLETE, attempt=record.attempt
        )
        [_, reply] = await store.messages(ALICE, record.conversation.id)
        assert (reply.status, reply.content) == (MessageStatus.COMPLETE, "The answer.")
