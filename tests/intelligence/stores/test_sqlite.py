from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from intelligence.contracts import AuditRecord
from intelligence.stores.sqlite import SqliteAuditLog, SqliteConversationStore
from tests.intelligence.stores.conversation_contract import ConversationStoreContract


class TestSqliteConversationStore(ConversationStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqliteConversationStore]:
        store = SqliteConversationStore(tmp_path / "conversations.db")
        await store.open()
        yield store
        await store.close()


async def test_conversations_survive_a_restart(tmp_path: Path) -> None:
    from tests.intelligence.stores.conversation_contract import ALICE

    first = SqliteConversationStore(tmp_path / "c.db")
    await first.open()
    c = await first.create(ALICE, "durable")
    await first.add_message(ALICE, c.id, "user", "remember me")
    await first.close()
    second = SqliteConversationStore(tmp_path / "c.db")
    await second.open()
    assert [m.content for m in await second.messages(ALICE, c.id)] == ["remember me"]
    await second.close()


async def test_audit_log_appends_and_reads_back(tmp_path: Path) -> None:
    log = SqliteAuditLog(tmp_path / "audit.db")
    await log.open()
    record = AuditRecord(
        "chat.turn", "contoso", "alice", "cid", {"sources": ["a"]}, datetime.now(UTC)
    )
    await log.append(record)
    await log.append(AuditRecord("other", "contoso", "bob", None, {}, datetime.now(UTC)))
    assert await log.records(event="chat.turn") == [record]
    assert len(await log.records()) == 2
    await log.close()
