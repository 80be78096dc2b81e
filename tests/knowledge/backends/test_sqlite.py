from __future__ import annotations

import dataclasses
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from knowledge.backends.sqlite import SqliteKnowledgeIndex, to_match_expression
from knowledge.contracts import AccessFilter, IndexUnavailable
from tests.knowledge.factories import access, caller_filter, make_chunks
from tests.knowledge.index_contract import KnowledgeIndexContract

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
    assert index.name == "sqlite-fts5"
    with sqlite3.connect(tmp_path / "nested" / "knowledge.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_chunks_survive_a_restart(tmp_path: Path) -> None:
    first = SqliteKnowledgeIndex(tmp_path / "k.db")
    await first.open()
    await first.replace_document("faq", make_chunks("faq", "data is kept 400 days", acl=PUBLIC))
    await first.close()

    second = SqliteKnowledgeIndex(tmp_path / "k.db")
    await second.open()
    await second.open()  # opening twice is harmless
    passages, _ = await second.search("kept", READER, 5)
    assert [p.chunk.chunk_id for p in passages] == ["faq-0"]
    await second.close()
    await second.close()


async def test_using_a_closed_index_fails_closed(tmp_path: Path) -> None:
    index = SqliteKnowledgeIndex(tmp_path / "k.db")
    with pytest.raises(IndexUnavailable):
        await index.search("anything", READER, 5)
    with pytest.raises(IndexUnavailable):
        await index.get_chunk("faq-0", READER)


async def test_a_broken_database_fails_closed(index: SqliteKnowledgeIndex, tmp_path: Path) -> None:
    await index.replace_document("faq", make_chunks("faq", "data is kept 400 days", acl=PUBLIC))
    with sqlite3.connect(tmp_path / "nested" / "knowledge.db") as raw:
        raw.execute("DROP TABLE chunk_principals")

    with pytest.raises(IndexUnavailable) as raised:
        await index.search("kept", READER, 5)
    assert "chunk_principals" not in str(raised.value)  # no raw SQLite detail for users
    with pytest.raises(IndexUnavailable):
        await index.get_chunk("faq-0", READER)


async def test_a_failed_replacement_leaves_the_old_document(index: SqliteKnowledgeIndex) -> None:
    await index.replace_document("a", make_chunks("a", "first version", acl=PUBLIC))
    await index.replace_document("b", make_chunks("b", "other", acl=PUBLIC))
    # Reusing b's chunk id inside document a violates uniqueness half-way through.
    first, second = make_chunks("a", "second version", "also second", acl=PUBLIC)
    with pytest.raises(IndexUnavailable):
        await index.replace_document("a", [first, dataclasses.replace(second, chunk_id="b-0")])
    passages, _ = await index.search("version", READER, 5)
    assert [p.chunk.text for p in passages] == ["first version"]


async def test_chunks_of_another_document_are_refused(index: SqliteKnowledgeIndex) -> None:
    with pytest.raises(ValueError, match="do not belong"):
        await index.replace_document("a", make_chunks("b", "text", acl=PUBLIC))


async def test_an_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "k.db") as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(IndexUnavailable, match="schema version 99"):
        await SqliteKnowledgeIndex(tmp_path / "k.db").open()


async def test_top_k_must_be_positive(index: SqliteKnowledgeIndex) -> None:
    with pytest.raises(ValueError, match="top_k"):
        await index.search("anything", READER, 0)


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
    await index.replace_document("leave", make_chunks("leave", "27 days", "carry 5", acl=HR))
    before = await generation(index)
    # What `lamina ingest` does to every file it finds again: nothing changed, nothing moves.
    await index.replace_document("leave", make_chunks("leave", "27 days", "carry 5", acl=HR))
    await index.delete_document("never-indexed")
    await index.replace_document("never-indexed", [])
    assert await generation(index) == before


async def test_a_failed_replacement_keeps_the_generation(index: SqliteKnowledgeIndex) -> None:
    await index.replace_document("a", make_chunks("a", "first version", acl=PUBLIC))
    await index.replace_document("b", make_chunks("b", "other", acl=PUBLIC))
    before = await generation(index)
    first, second = make_chunks("a", "second version", "also second", acl=PUBLIC)
    with pytest.raises(IndexUnavailable):
        await index.replace_document("a", [first, dataclasses.replace(second, chunk_id="b-0")])
    assert await generation(index) == before


async def test_generations_are_per_tenant(index: SqliteKnowledgeIndex) -> None:
    carol = caller_filter("fabrikam", "carol@fabrikam.com", "hr")
    await index.replace_document("c", make_chunks("c", "contoso text", acl=HR))
    contoso, fabrikam = await generation(index), await generation(index, carol)
    await index.replace_document(
        "f", make_chunks("f", "fabrikam", acl=access("fabrikam", public=True))
    )
    assert await generation(index) == contoso
    assert await generation(index, carol) != fabrikam

    # A document that moves between tenants changes both.
    contoso, fabrikam = await generation(index), await generation(index, carol)
    await index.replace_document(
        "c", make_chunks("c", "now fabrikam's", acl=access("fabrikam", public=True))
    )
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
        await ingest.replace_document("leave", make_chunks("leave", "27 days", acl=HR))
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
        await index.replace_document("leave", make_chunks("leave", "27 days", acl=HR))
        generations.append(await generation(index))
        await index.close()
    # Same writes, same counter: only the file's identity tells the two apart.
    assert generations[0] != generations[1]
    assert generations[0].endswith(":1") and generations[1].endswith(":1")


async def test_a_version_1_index_is_upgraded_in_place(tmp_path: Path) -> None:
    index = SqliteKnowledgeIndex(tmp_path / "k.db")
    await index.open()
    await index.replace_document("leave", make_chunks("leave", "27 days", acl=HR))
    await index.close()
    with sqlite3.connect(tmp_path / "k.db") as raw:  # what version 1 wrote
        raw.executescript(
            "DROP TABLE corpus_generations; DROP TABLE index_identity;"
            " DROP INDEX chunk_principals_by_principal; PRAGMA user_version = 1;"
        )

    index = SqliteKnowledgeIndex(tmp_path / "k.db")
    await index.open()
    try:
        scope = await index.access_scope(ALICE)
        await index.replace_document("leave", make_chunks("leave", "30 days", acl=HR))
        assert await generation(index) != scope.generation
        passages, _ = await index.search("days", ALICE, 5)
        assert [p.chunk.text for p in passages] == ["30 days"]
    finally:
        await index.close()
    with sqlite3.connect(tmp_path / "k.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (2,)
