from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from intelligence.contracts import AuditRecord, MessageStatus, Principal, RetentionPolicy
from intelligence.stores.sqlite import SqliteAuditLog, SqliteConversationStore
from tests.intelligence.stores.conversation_contract import (
    ALICE,
    BOB,
    EVE,
    RETENTION,
    ConversationStoreContract,
    finished_turn,
    new_turn,
)

FRED = Principal("fabrikam", "fred")


class TestSqliteConversationStore(ConversationStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqliteConversationStore]:
        store = SqliteConversationStore(tmp_path / "conversations.db", retention=RETENTION)
        await store.open()
        yield store
        await store.close()


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[SqliteConversationStore]:
    store = SqliteConversationStore(tmp_path / "c.db")
    await store.open()
    yield store
    await store.close()


async def test_conversations_survive_a_restart(tmp_path: Path) -> None:
    first = SqliteConversationStore(tmp_path / "c.db")
    await first.open()
    c = await first.create(ALICE, "durable")
    await first.add_message(ALICE, c.id, "user", "remember me")
    await first.begin_turn(ALICE, new_turn(conversation_id=c.id, key="k1"))
    await first.close()
    second = SqliteConversationStore(tmp_path / "c.db")
    await second.open()
    assert (await second.messages(ALICE, c.id))[0].content == "remember me"
    assert (await second.begin_turn(ALICE, new_turn(key="k1"))).created is False
    await second.close()


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
    store = SqliteConversationStore(path)
    await store.open()
    try:
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
    finally:
        await store.close()
    # Opening the upgraded file again changes nothing.
    again = SqliteConversationStore(path)
    await again.open()
    assert len(await again.messages(ALICE, "c1")) == 6
    await again.close()


async def test_two_processes_racing_one_key_create_one_turn(tmp_path: Path) -> None:
    # Two stores on one file stand for two replicas: BEGIN IMMEDIATE serialises them.
    stores = [SqliteConversationStore(tmp_path / "shared.db") for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        records = await asyncio.gather(
            *(stores[i % 2].begin_turn(ALICE, new_turn(key="race")) for i in range(10))
        )
        assert sum(r.created for r in records) == 1
        assert len({r.reply.id for r in records}) == 1
        assert len((await stores[0].list_conversations(ALICE)).items) == 1
    finally:
        for store in stores:
            await store.close()


async def test_purge_applies_the_default_and_per_tenant_periods(tmp_path: Path) -> None:
    retention = RetentionPolicy(default_s=3600.0, tenants={"contoso": None, "ephemeral": 60.0})
    store = SqliteConversationStore(tmp_path / "c.db", retention=retention)
    await store.open()
    try:
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
    finally:
        await store.close()


async def test_a_naive_datetime_is_refused(opened: SqliteConversationStore) -> None:
    with pytest.raises(ValueError, match="timezone"):
        await opened.begin_turn(ALICE, new_turn(lease_until=datetime.now()))
    with pytest.raises(ValueError, match="timezone"):
        await opened.interrupt_abandoned(datetime.now())
    assert (await opened.list_conversations(ALICE)).items == ()


async def test_a_failed_write_leaves_the_store_usable(opened: SqliteConversationStore) -> None:
    with pytest.raises(LookupError):
        await opened.begin_turn(BOB, new_turn(conversation_id="missing", key="k"))
    record = await opened.begin_turn(BOB, new_turn(key="k"))
    assert record.created
    assert len(await opened.messages(BOB, record.conversation.id)) == 2


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
