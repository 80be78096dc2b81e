"""A write whose COMMIT fails must not leave the index's one connection inside a
transaction.

SQLite can refuse a COMMIT and keep the transaction open (a deferred constraint that
fails, ``SQLITE_BUSY`` outside WAL mode, some I/O errors). If the index only mapped the
error and moved on, every later read and write of the process would fail with "cannot
start a transaction within a transaction" until a restart, and outside WAL mode the
open transaction would keep other processes from writing. A deferred foreign key that a
trigger violates is a real, deterministic way to make SQLite refuse the COMMIT.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import IndexUnavailable, SearchMode, SearchRequest
from tests.knowledge.factories import access, caller_filter, make_chunks
from tests.knowledge.index_contract import put

READER = caller_filter("contoso", "reader@contoso.com")
PUBLIC = access(public=True)

# A chunk whose text is 'refused at commit' adds a row whose deferred foreign key names
# no chunk: the statement succeeds, and SQLite refuses the COMMIT.
_REFUSE_AT_COMMIT = """
CREATE TABLE commit_guard (
    chunk INTEGER REFERENCES chunks (id) DEFERRABLE INITIALLY DEFERRED
);
CREATE TRIGGER commit_guard_insert AFTER INSERT ON chunks
WHEN new.text = 'refused at commit' BEGIN
    INSERT INTO commit_guard (chunk) VALUES (-1);
END;
"""


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    path = tmp_path / "knowledge.db"
    index = SqliteKnowledgeIndex(path)
    await index.open()
    with sqlite3.connect(path) as raw:
        raw.executescript(_REFUSE_AT_COMMIT)
    yield index
    await index.close()


async def test_a_refused_commit_rolls_back_and_leaves_the_index_usable(
    index: SqliteKnowledgeIndex,
) -> None:
    await put(index, "a", make_chunks("a", "first text", acl=PUBLIC))
    # Loads the in-memory arrays, so the failed write's bookkeeping is exercised too.
    await index.search(SearchRequest("text", 5, SearchMode.TEXT), READER)

    with pytest.raises(IndexUnavailable):
        await put(index, "a", make_chunks("a", "refused at commit", acl=PUBLIC))

    # The refused write left nothing behind, and the connection takes new transactions.
    hits = await index.search(SearchRequest("text", 5, SearchMode.TEXT), READER)
    assert [p.chunk.text for p in hits.passages] == ["first text"]
    await put(index, "b", make_chunks("b", "second text", acl=PUBLIC))
    hits = await index.search(SearchRequest("text", 5, SearchMode.TEXT), READER)
    assert sorted(p.chunk.text for p in hits.passages) == ["first text", "second text"]
