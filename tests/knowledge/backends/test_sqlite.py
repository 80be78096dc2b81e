from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from knowledge.backends.sqlite import SqliteKnowledgeIndex, to_match_expression
from knowledge.contracts import AccessFilter, IndexUnavailable, RetrievedPassage, SearchMode
from tests.knowledge.factories import HashingEmbedder, access, caller_filter, make_chunks
from tests.knowledge.index_contract import KnowledgeIndexContract, put, search, text_search

READER = caller_filter("contoso", "reader@contoso.com")
PUBLIC = access(public=True)


class TestSqliteKnowledgeIndex(KnowledgeIndexContract):
    @pytest.fixture
    async def index(self, tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
        index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
        await index.open()
        yield index
        await index.close()


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    index = SqliteKnowledgeIndex(tmp_path / "nested" / "knowledge.db")
    await index.open()
    yield index
    await index.close()


async def test_name_and_wal_journal(index: SqliteKnowledgeIndex, tmp_path: Path) -> None:
    assert index.name == "sqlite-hybrid"
    with sqlite3.connect(tmp_path / "nested" / "knowledge.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_chunks_survive_a_restart(tmp_path: Path) -> None:
    first = SqliteKnowledgeIndex(tmp_path / "k.db")
    await first.open()
    await put(first, "faq", make_chunks("faq", "data is kept 400 days", acl=PUBLIC))
    await first.close()

    second = SqliteKnowledgeIndex(tmp_path / "k.db")
    await second.open()
    await second.open()  # opening twice is harmless
    passages, _ = await text_search(second, "kept", READER, 5)
    assert [p.chunk.chunk_id for p in passages] == ["faq-0"]
    await second.close()
    await second.close()


async def test_using_a_closed_index_fails_closed(tmp_path: Path) -> None:
    index = SqliteKnowledgeIndex(tmp_path / "k.db")
    with pytest.raises(IndexUnavailable):
        await text_search(index, "anything", READER, 5)
    with pytest.raises(IndexUnavailable):
        await index.get_chunk("faq-0", READER)


async def test_a_broken_database_fails_closed(index: SqliteKnowledgeIndex, tmp_path: Path) -> None:
    await put(index, "faq", make_chunks("faq", "data is kept 400 days", acl=PUBLIC))
    with sqlite3.connect(tmp_path / "nested" / "knowledge.db") as raw:
        raw.execute("DROP TABLE chunk_principals")

    with pytest.raises(IndexUnavailable) as raised:
        await text_search(index, "kept", READER, 5)
    assert "chunk_principals" not in str(raised.value)  # no raw SQLite detail for users
    with pytest.raises(IndexUnavailable):
        await index.get_chunk("faq-0", READER)


async def test_a_failed_replacement_leaves_the_old_document(index: SqliteKnowledgeIndex) -> None:
    await put(index, "a", make_chunks("a", "first version", acl=PUBLIC))
    await put(index, "b", make_chunks("b", "other", acl=PUBLIC))
    # Reusing b's chunk id inside document a violates uniqueness half-way through.
    first, second = make_chunks("a", "second version", "also second", acl=PUBLIC)
    with pytest.raises(IndexUnavailable):
        await put(index, "a", [first, dataclasses.replace(second, chunk_id="b-0")])
    passages, _ = await text_search(index, "version", READER, 5)
    assert [p.chunk.text for p in passages] == ["first version"]


async def test_chunks_of_another_document_are_refused(index: SqliteKnowledgeIndex) -> None:
    with pytest.raises(ValueError, match="do not belong"):
        await put(index, "a", make_chunks("b", "text", acl=PUBLIC))


async def test_an_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "k.db") as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(IndexUnavailable, match="schema version 99"):
        await SqliteKnowledgeIndex(tmp_path / "k.db").open()


async def test_top_k_must_be_positive(index: SqliteKnowledgeIndex) -> None:
    with pytest.raises(ValueError, match="top_k"):
        await text_search(index, "anything", READER, 0)


class TestMatchExpression:
    def test_terms_are_quoted_and_ored_without_stopwords(self) -> None:
        assert to_match_expression("What is the budget for Project Falcon?") == (
            '"budget" OR "project" OR "falcon"'
        )

    def test_a_query_of_stopwords_still_searches(self) -> None:
        assert to_match_expression("Who is it") == '"who" OR "is" OR "it"'

    def test_repeated_terms_appear_once(self) -> None:
        assert to_match_expression("falcon FALCON Falcon") == '"falcon"'

    @pytest.mark.parametrize("text", ["", "   ", "?!*^", '""', "🦅"])
    def test_no_terms_means_no_expression(self, text: str) -> None:
        assert to_match_expression(text) is None

    def test_operators_become_quoted_words(self) -> None:
        assert to_match_expression("NEAR(a b) AND title:x*") == '"near" OR "b" OR "title" OR "x"'

    def test_any_input_yields_only_quoted_terms(self) -> None:
        shape = re.compile(r'"[^"\s]+"( OR "[^"\s]+")*')
        generator = random.Random(7)
        alphabet = "abcXYZ éü東 \"'*^:+-(){}\\\x00\n"
        for _ in range(500):
            text = "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 30)))
            expression = to_match_expression(text)
            assert expression is None or shape.fullmatch(expression), text


# --- access scope: generations -------------------------------------------------------

ALICE = caller_filter("contoso", "alice@contoso.com", "hr")
HR = access(groups=["hr"])


async def generation(index: SqliteKnowledgeIndex, caller: AccessFilter = ALICE) -> str:
    return (await index.access_scope(caller)).generation


async def test_an_unchanged_document_keeps_the_generation(index: SqliteKnowledgeIndex) -> None:
    await put(index, "leave", make_chunks("leave", "27 days", "carry 5", acl=HR))
    before = await generation(index)
    # What `lamina ingest` does to every file it finds again: nothing changed, nothing moves.
    await put(index, "leave", make_chunks("leave", "27 days", "carry 5", acl=HR))
    await index.delete_document("never-indexed")
    await put(index, "never-indexed", [])
    assert await generation(index) == before


async def test_a_failed_replacement_keeps_the_generation(index: SqliteKnowledgeIndex) -> None:
    await put(index, "a", make_chunks("a", "first version", acl=PUBLIC))
    await put(index, "b", make_chunks("b", "other", acl=PUBLIC))
    before = await generation(index)
    first, second = make_chunks("a", "second version", "also second", acl=PUBLIC)
    with pytest.raises(IndexUnavailable):
        await put(index, "a", [first, dataclasses.replace(second, chunk_id="b-0")])
    assert await generation(index) == before


async def test_generations_are_per_tenant(index: SqliteKnowledgeIndex) -> None:
    carol = caller_filter("fabrikam", "carol@fabrikam.com", "hr")
    await put(index, "c", make_chunks("c", "contoso text", acl=HR))
    contoso, fabrikam = await generation(index), await generation(index, carol)
    await put(index, "f", make_chunks("f", "fabrikam", acl=access("fabrikam", public=True)))
    assert await generation(index) == contoso
    assert await generation(index, carol) != fabrikam

    # A document that moves between tenants changes both.
    contoso, fabrikam = await generation(index), await generation(index, carol)
    await put(index, "c", make_chunks("c", "now fabrikam's", acl=access("fabrikam", public=True)))
    assert await generation(index) != contoso
    assert await generation(index, carol) != fabrikam


async def test_a_write_by_another_process_is_seen(
    index: SqliteKnowledgeIndex, tmp_path: Path
) -> None:
    before = await index.access_scope(ALICE)
    # `lamina ingest` runs in another process with its own connection to the same file.
    ingest = SqliteKnowledgeIndex(tmp_path / "nested" / "knowledge.db")
    await ingest.open()
    try:
        await put(ingest, "leave", make_chunks("leave", "27 days", acl=HR))
    finally:
        await ingest.close()
    after = await index.access_scope(ALICE)
    assert after.generation != before.generation
    assert after.fingerprint != before.fingerprint  # "hr" is named now


async def test_a_new_database_never_repeats_an_old_generation(tmp_path: Path) -> None:
    generations = []
    for name in ("first.db", "second.db"):
        index = SqliteKnowledgeIndex(tmp_path / name)
        await index.open()
        await put(index, "leave", make_chunks("leave", "27 days", acl=HR))
        generations.append(await generation(index))
        await index.close()
    # Same writes, same counter: only the file's identity tells the two apart.
    assert generations[0] != generations[1]
    assert generations[0].endswith(":1") and generations[1].endswith(":1")


# What version 2 wrote: grants as 'u:' / 'g:' rows, an FTS table without ACL tokens.
_VERSION_2 = """
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY, chunk_id TEXT NOT NULL UNIQUE, document_id TEXT NOT NULL,
    source TEXT NOT NULL, title TEXT NOT NULL, text TEXT NOT NULL, ordinal INTEGER NOT NULL,
    page INTEGER, section TEXT, tenant_id TEXT NOT NULL, public INTEGER NOT NULL
);
CREATE TABLE chunk_principals (
    chunk INTEGER NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    principal TEXT NOT NULL, PRIMARY KEY (chunk, principal)
) WITHOUT ROWID;
CREATE TABLE corpus_generations (tenant_id TEXT PRIMARY KEY, generation INTEGER NOT NULL);
CREATE TABLE index_identity (id INTEGER PRIMARY KEY, instance TEXT NOT NULL);
INSERT INTO index_identity VALUES (1, 'old');
INSERT INTO corpus_generations VALUES ('contoso', 7);
CREATE VIRTUAL TABLE chunks_fts USING fts5 (
    text, title, section, content = 'chunks', content_rowid = 'id', tokenize = 'porter unicode61'
);
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, title, section)
    VALUES (new.id, new.text, new.title, new.section);
END;
INSERT INTO chunks VALUES (1, 'leave-0', 'leave', 'leave.md', 'Leave', '27 days of leave',
                           0, NULL, NULL, 'contoso', 0);
INSERT INTO chunks VALUES (2, 'faq-0', 'faq', 'faq.md', 'FAQ', 'leave questions',
                           0, NULL, NULL, 'contoso', 1);
INSERT INTO chunk_principals VALUES (1, 'g:hr'), (1, 'u:ceo@contoso.com');
PRAGMA user_version = 2;
"""


async def test_a_version_2_index_is_upgraded_in_place(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "k.db") as raw:
        raw.executescript(_VERSION_2)

    index = SqliteKnowledgeIndex(tmp_path / "k.db")
    await index.open()
    try:
        assert index.embedding is None
        passages, trimmed = await text_search(index, "leave", ALICE, 5)
        assert {p.chunk.chunk_id for p in passages} == {"leave-0", "faq-0"}
        assert passages[0].chunk.access == access(groups=["hr"], users=["ceo@contoso.com"])
        passages, trimmed = await text_search(index, "leave", READER, 5)
        assert [p.chunk.chunk_id for p in passages] == ["faq-0"]
        assert trimmed == 1
        ceo = caller_filter("contoso", "ceo@contoso.com")
        assert (await index.get_chunk("leave-0", ceo)) is not None
        states = {state.document_id: state for state in await index.documents("contoso")}
        assert states["leave"].content_hash == ""  # unknown: the next ingest re-indexes it
        assert states["leave"].access == access(groups=["hr"], users=["ceo@contoso.com"])
        assert (await index.access_scope(ALICE)).generation == "old:7"
        await put(index, "leave", make_chunks("leave", "30 days", acl=HR))
        passages, _ = await text_search(index, "days", ALICE, 5)
        assert [p.chunk.text for p in passages] == ["30 days"]
    finally:
        await index.close()
    with sqlite3.connect(tmp_path / "k.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (3,)


async def test_two_processes_upgrading_the_same_file_at_once_both_open_it(
    tmp_path: Path,
) -> None:
    with sqlite3.connect(tmp_path / "k.db") as raw:
        raw.executescript(_VERSION_2)
    # A server and `lamina ingest` started together both find version 2; one upgrades.
    indexes = [SqliteKnowledgeIndex(tmp_path / "k.db") for _ in range(4)]
    try:
        await asyncio.gather(*(index.open() for index in indexes))
        for index in indexes:
            passages, _ = await text_search(index, "leave", READER, 5)
            assert [p.chunk.chunk_id for p in passages] == ["faq-0"]
    finally:
        for index in indexes:
            await index.close()
    with sqlite3.connect(tmp_path / "k.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (3,)
        assert raw.execute("SELECT count(*) FROM documents").fetchone() == (2,)


async def test_vectors_written_by_another_process_are_searched(
    index: SqliteKnowledgeIndex, tmp_path: Path
) -> None:
    embedder = HashingEmbedder(32)
    await put(index, "a", make_chunks("a", "annual leave policy", acl=PUBLIC), embedder)
    assert [p.chunk.chunk_id for p in await vector_search(index, embedder, "leave")] == ["a-0"]

    other = SqliteKnowledgeIndex(tmp_path / "nested" / "knowledge.db")
    await other.open()
    try:
        await put(other, "b", make_chunks("b", "annual leave calendar", acl=PUBLIC), embedder)
        await other.update_access("a", HR)
    finally:
        await other.close()
    assert [p.chunk.chunk_id for p in await vector_search(index, embedder, "leave")] == ["b-0"]


async def vector_search(
    index: SqliteKnowledgeIndex, embedder: HashingEmbedder, text: str
) -> list[RetrievedPassage]:
    passages, _ = await search(index, embedder, text, READER, 5, SearchMode.VECTOR)
    return passages


async def test_an_emptied_index_forgets_its_embedding_model(index: SqliteKnowledgeIndex) -> None:
    await put(index, "a", make_chunks("a", "leave", acl=PUBLIC), HashingEmbedder(32))
    await index.delete_document("a")
    assert index.embedding is None
    # Re-indexing with another model can start over without deleting the file.
    other = HashingEmbedder(48, model="other")
    await put(index, "a", make_chunks("a", "leave", acl=PUBLIC), other)
    assert index.embedding == other.identity


async def test_a_vector_search_of_an_index_without_vectors_says_so(
    index: SqliteKnowledgeIndex,
) -> None:
    await put(index, "a", make_chunks("a", "leave", acl=PUBLIC))
    with pytest.raises(IndexUnavailable, match="no vectors"):
        await vector_search(index, HashingEmbedder(32), "leave")
    # Hybrid falls back to the text list alone.
    passages, _ = await search(index, HashingEmbedder(32), "leave", READER, 5, SearchMode.HYBRID)
    assert [p.chunk.chunk_id for p in passages] == ["a-0"]


async def test_an_interrupted_write_leaves_the_previous_document(
    index: SqliteKnowledgeIndex,
) -> None:
    embedder = HashingEmbedder(32)
    await put(index, "a", make_chunks("a", "first version", acl=PUBLIC), embedder)
    # A vector of the wrong size fails after the old chunks were read, inside the write.
    with pytest.raises(ValueError, match="dimensions"):
        await index.replace_document(
            "a",
            make_chunks("a", "second version", acl=PUBLIC),
            content_hash="x",
            vectors=[[0.5] * 31],
            embedding=embedder.identity,
        )
    passages = await vector_search(index, embedder, "version")
    assert [p.chunk.text for p in passages] == ["first version"]


async def test_a_write_cancelled_while_it_begins_leaves_the_index_writable(
    index: SqliteKnowledgeIndex,
) -> None:
    # An ingest job stopped mid-write: its BEGIN still runs on the connection's thread.
    writing = asyncio.create_task(put(index, "a", make_chunks("a", "first text", acl=PUBLIC)))
    await asyncio.sleep(0)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing

    await put(index, "b", make_chunks("b", "second text", acl=PUBLIC))
    assert [d.document_id for d in await index.documents("contoso")] == ["b"]
