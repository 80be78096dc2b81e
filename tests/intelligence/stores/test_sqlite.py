from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from intelligence.contracts import MessageStatus, Principal, RetentionPolicy
from intelligence.stores.sqlite import SqliteConversationStore
from intelligence.stores.stamps import stamp
from tests.intelligence.stores.conversation_contract import (
    ALICE,
    BOB,
    EVE,
    RETENTION,
    ConversationStoreContract,
    finished_turn,
    new_turn,
)
from tests.support.lifecycle import opened

FRED = Principal("fabrikam", "fred")


class TestSqliteConversationStore(ConversationStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqliteConversationStore]:
        path = tmp_path / "conversations.db"
        async with opened(SqliteConversationStore(path, retention=RETENTION)) as store:
            yield store


async def test_conversations_survive_a_restart(tmp_path: Path) -> None:
    async with opened(SqliteConversationStore(tmp_path / "c.db")) as first:
        c = (await first.begin_turn(ALICE, new_turn("remember me"))).conversation
        await first.begin_turn(ALICE, new_turn(conversation_id=c.id, key="k1"))
    async with opened(SqliteConversationStore(tmp_path / "c.db")) as second:
        assert (await second.messages(ALICE, c.id))[0].content == "remember me"
        assert (await second.begin_turn(ALICE, new_turn(key="k1"))).created is False


# The schema of the version before turns, leases and summaries, as databases hold it.
_FIRST_SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_owner
    ON conversations (tenant_id, user_id, updated_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    citations TEXT NOT NULL DEFAULT '[]',
    plan TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id, seq);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    event TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    correlation_id TEXT,
    data TEXT NOT NULL
);
"""


def _database_of_the_first_schema(path: Path, written_at: datetime) -> None:
    at = written_at.isoformat()
    db = sqlite3.connect(path)
    db.executescript(_FIRST_SCHEMA)
    db.execute(
        "INSERT INTO conversations VALUES ('c1', 'contoso', 'alice', 'Leave', ?, ?)", (at, at)
    )
    db.executemany(
        "INSERT INTO messages (id, conversation_id, role, content, status, created_at)"
        " VALUES (?, 'c1', ?, ?, ?, ?)",
        [
            ("m1", "user", "Leave?", "complete", at),
            ("m2", "assistant", "27 days", "complete", at),
            ("m3", "user", "Sick days?", "complete", at),
            ("m4", "assistant", "You get", "streaming", at),  # its process died
        ],
    )
    db.commit()
    db.close()


async def test_a_database_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    written_at = datetime.now(UTC) - timedelta(days=1)
    _database_of_the_first_schema(path, written_at)
    async with opened(SqliteConversationStore(path)) as store:
        conversation = await store.get(ALICE, "c1")
        assert conversation is not None
        assert (conversation.title, conversation.summary, conversation.summary_through) == (
            "Leave",
            "",
            None,
        )
        assert [m.content for m in await store.messages(ALICE, "c1")] == [
            "Leave?",
            "27 days",
            "Sick days?",
            "You get",
        ]
        # A reply left streaming by the old version counts as abandoned...
        assert await store.interrupt_abandoned(datetime.now(UTC)) == 1
        # ...and is retried with its question, though it has no turn row.
        now = datetime.now(UTC)
        claimed = await store.retry_turn(ALICE, "m4", now + timedelta(minutes=1), now=now)
        assert claimed is not None
        assert (claimed.user_message.id, claimed.user_message.content) == ("m3", "Sick days?")
        assert claimed.idempotency_key is None
        await store.finish_message(ALICE, "m4", "10 days", MessageStatus.COMPLETE)

        await store.save_summary(ALICE, "c1", "Leave and sick days.", "m4")
        turn = await store.begin_turn(ALICE, new_turn("Holidays?", conversation_id="c1", key="k"))
        assert turn.created and turn.conversation.summary == "Leave and sick days."
        assert (await store.begin_turn(ALICE, new_turn(key="k"))).created is False
        page = await store.list_conversations(ALICE, limit=1)
        assert [c.id for c in page.items] == ["c1"]
        [exported] = await store.export_user(ALICE)
        assert len(exported.messages) == 6
    # Opening the upgraded file again changes nothing.
    async with opened(SqliteConversationStore(path)) as again:
        assert len(await again.messages(ALICE, "c1")) == 6


async def test_two_processes_racing_one_key_create_one_turn(tmp_path: Path) -> None:
    # Two stores on one file stand for two replicas: BEGIN IMMEDIATE serialises them.
    async with AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(opened(SqliteConversationStore(tmp_path / "shared.db")))
            for _ in range(2)
        ]
        records = await asyncio.gather(
            *(stores[i % 2].begin_turn(ALICE, new_turn(key="race")) for i in range(10))
        )
        assert sum(r.created for r in records) == 1
        assert len({r.reply.id for r in records}) == 1
        assert len((await stores[0].list_conversations(ALICE)).items) == 1


async def test_purge_applies_the_default_and_per_tenant_periods(tmp_path: Path) -> None:
    retention = RetentionPolicy(default_s=3600.0, tenants={"contoso": None, "ephemeral": 60.0})
    async with opened(SqliteConversationStore(tmp_path / "c.db", retention=retention)) as store:
        kept = await finished_turn(store, ALICE, "Leave?", "27 days", key="k")
        eves = await finished_turn(store, EVE, "Old", "answer", key="k")
        other = await finished_turn(store, FRED, "Q", "A")
        now = datetime.now(UTC)
        # Within every period: nothing goes.
        assert await store.purge_expired(now + timedelta(seconds=30)) == 0
        # Past ephemeral's minute, not yet the default hour.
        assert await store.purge_expired(now + timedelta(minutes=2)) == 2
        assert await store.get(EVE, eves.conversation.id) is None
        assert await store.find_turn(EVE, "k") is None
        assert (await store.begin_turn(EVE, new_turn(key="k"))).created
        assert len(await store.messages(FRED, other.conversation.id)) == 2
        # Past the default hour: fabrikam goes, contoso (kept forever) stays.
        assert await store.purge_expired(now + timedelta(hours=2)) == 4
        assert await store.get(FRED, other.conversation.id) is None
        assert len(await store.messages(ALICE, kept.conversation.id)) == 2


async def test_a_summary_of_purged_messages_goes_with_them(tmp_path: Path) -> None:
    retention = RetentionPolicy(tenants={"ephemeral": 60.0})
    async with opened(SqliteConversationStore(tmp_path / "c.db", retention=retention)) as store:
        old = await finished_turn(store, EVE, "Old question", "old answer")
        await store.save_summary(EVE, old.conversation.id, "EVE asked about X", old.reply.id)
        newer = await finished_turn(
            store, EVE, "New", "new answer", conversation_id=old.conversation.id
        )
        later = datetime.now(UTC) + timedelta(minutes=2)
        # Only the old turn is past its minute; pretend the new one came just now.
        await store._connection.execute(
            "UPDATE messages SET created_at = ? WHERE id IN (?, ?)",
            (stamp(later), newer.user_message.id, newer.reply.id),
        )
        await store._connection.commit()
        assert await store.purge_expired(later) == 2
        conversation = await store.get(EVE, old.conversation.id)
        assert conversation is not None
        assert (conversation.summary, conversation.summary_through) == ("", None)


async def test_a_naive_datetime_is_refused(store: SqliteConversationStore) -> None:
    with pytest.raises(ValueError, match="timezone"):
        await store.begin_turn(ALICE, new_turn(lease_until=datetime.now()))
    with pytest.raises(ValueError, match="timezone"):
        await store.interrupt_abandoned(datetime.now())
    assert (await store.list_conversations(ALICE)).items == ()


async def test_a_failed_write_leaves_the_store_usable(store: SqliteConversationStore) -> None:
    with pytest.raises(LookupError):
        await store.begin_turn(BOB, new_turn(conversation_id="missing", key="k"))
    record = await store.begin_turn(BOB, new_turn(key="k"))
    assert record.created
    assert len(await store.messages(BOB, record.conversation.id)) == 2
