"""A write of a SQLite store whose COMMIT fails must not leave the store's one shared
connection inside a transaction.

SQLite can refuse a COMMIT and keep the transaction open (a deferred constraint that
fails, ``SQLITE_BUSY`` outside WAL mode, some I/O errors). Were the transaction left
open, every later write of the process would fail with "cannot start a transaction
within a transaction". A deferred foreign key that a trigger violates is a real,
deterministic way to make SQLite refuse the COMMIT.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from intelligence.contracts import MessageStatus, Principal
from intelligence.stores.sqlite import SqliteConversationStore
from tests.intelligence.stores.conversation_contract import new_turn
from tests.support.lifecycle import opened

ALICE = Principal("contoso", "alice")

# Renewing a turn with the answer 'refused at commit' adds a row whose deferred foreign
# key names no conversation: the UPDATE succeeds, and SQLite refuses the COMMIT.
_REFUSE_AT_COMMIT = """
CREATE TABLE commit_guard (
    conversation TEXT REFERENCES conversations (id) DEFERRABLE INITIALLY DEFERRED
);
CREATE TRIGGER commit_guard_update AFTER UPDATE OF content ON messages
WHEN new.content = 'refused at commit' BEGIN
    INSERT INTO commit_guard (conversation) VALUES ('no such conversation');
END;
"""


async def test_a_refused_commit_rolls_back_and_leaves_the_store_writable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    async with opened(SqliteConversationStore(path)) as store:
        with sqlite3.connect(path) as raw:
            raw.executescript(_REFUSE_AT_COMMIT)
        record = await store.begin_turn(ALICE, new_turn())
        assert record.attempt is not None
        lease = datetime.now(UTC) + timedelta(seconds=30)

        with pytest.raises(sqlite3.IntegrityError):
            await store.renew_turn(
                ALICE, record.reply.id, "refused at commit", lease, attempt=record.attempt
            )

        assert await store.finish_message(
            ALICE, record.reply.id, "The answer.", MessageStatus.COMPLETE, attempt=record.attempt
        )
        [_, reply] = await store.messages(ALICE, record.conversation.id)
        assert (reply.status, reply.content) == (MessageStatus.COMPLETE, "The answer.")
