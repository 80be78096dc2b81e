"""The embedded index's in-memory ranking and arrays agree with SQLite itself.

Text search ranks with a numpy transcription of FTS5's bm25() over postings read from
FTS5's index, and a write by the index's own process updates the in-memory arrays
instead of reloading them. Both are fast paths whose mistakes would be silent (a
different order, a stale ACL), so these tests hold them to references: FTS5's own
ranking of the same permitted matches with the ACL inside its MATCH, and a freshly
opened index that loads everything from the file.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from knowledge.backends import sqlite as sqlite_backend
from knowledge.backends.sqlite import (
    _COUNT_MATCHES,
    _TEXT_SEARCH,
    SqliteKnowledgeIndex,
    principal_token,
    to_match_expression,
)
from knowledge.backends.sqlite_memory import document_lengths
from knowledge.contracts import AccessControl, AccessFilter, SearchMode, SearchRequest
from tests.knowledge.factories import HashingEmbedder, access, caller_filter, make_chunks
from tests.knowledge.index_contract import put

WORDS = ["falcon", "budget", "running", "runs", "runner", "kestrel", "rota", "audit"]
WORDS += ["figures", "office", "leave", "report"]
GROUPS = ["hr", "finance", "engineering", "sales"]
CALLERS = [
    caller_filter("contoso", "alice@contoso.com", "hr"),
    caller_filter("contoso", "bob@contoso.com", "engineering", "sales"),
    caller_filter("contoso", "owner-3@contoso.com"),
    caller_filter("contoso", "carol@contoso.com", "finance", "hr", "sales"),
]
QUERIES = [
    "falcon",
    "running budget",
    "kestrel rota audit",
    "Report on the office",
    "figures runner leave falcon",
    "handbook",  # only in titles
    "appendix",  # only in section headings
    "nothing matches this",
]


def _random_access(rng: random.Random, n: int) -> AccessControl:
    groups = rng.sample(GROUPS, rng.randint(0, 2))
    return access(
        "contoso" if n % 7 else "fabrikam",
        public=rng.random() < 0.1,
        users=[f"owner-{n % 5}@contoso.com"],
        groups=groups,
    )


async def _fill(index: SqliteKnowledgeIndex, seed: int, documents: int) -> None:
    rng = random.Random(seed)
    for n in range(documents):
        # Some chunks run past 127 tokens: their FTS5 sizes take two-byte varints.
        texts = [
            " ".join(rng.choices(WORDS, k=rng.choice([3, 12, 40, 150])))
            for _ in range(rng.randint(1, 3))
        ]
        chunks = make_chunks(
            f"d{n}",
            *texts,
            acl=_random_access(rng, n),
            title="Staff handbook" if n % 4 == 0 else "Notes",
            section="Appendix" if n % 5 == 0 else None,
        )
        await put(index, f"d{n}", chunks)


def _fts_ranking(
    path: Path, text: str, caller: AccessFilter, depth: int
) -> tuple[list[tuple[int, float]], int]:
    """FTS5's own answer: bm25() over the MATCH with the caller's ACL inside, and the
    trimmed count as two MATCH counts."""
    expression = to_match_expression(text)
    assert expression is not None
    tokens = [
        principal_token(caller.tenant_id, p)
        for p in ["public", f"user:{caller.user_id}", *(f"group:{g}" for g in caller.groups)]
    ]
    tenant = principal_token(caller.tenant_id, "tenant")

    def acl(ts: list[str]) -> str:
        return "acl : (" + " OR ".join(f'"{t}"' for t in ts) + ")"

    columns = "{text title section} : (" + expression + ")"
    with sqlite3.connect(path) as raw:
        rows = raw.execute(_TEXT_SEARCH, {"query": f"{columns} AND {acl(tokens)}", "depth": 10_000})
        ranked = [(int(row[0]), -float(row[1])) for row in rows]
        everyone = raw.execute(_COUNT_MATCHES, {"query": f"{columns} AND {acl([tenant])}"})
        permitted = raw.execute(_COUNT_MATCHES, {"query": f"{columns} AND {acl(tokens)}"})
        trimmed = int(everyone.fetchone()[0]) - int(permitted.fetchone()[0])
    return ranked[:depth], trimmed


async def _ranking(
    index: SqliteKnowledgeIndex, path: Path, text: str, caller: AccessFilter, top_k: int
) -> tuple[list[tuple[int, float]], int]:
    hits = await index.search(SearchRequest(text, top_k, SearchMode.TEXT), caller)
    with sqlite3.connect(path) as raw:
        ids = {str(row[1]): int(row[0]) for row in raw.execute("SELECT id, chunk_id FROM chunks")}
    return [(ids[p.chunk.chunk_id], p.score) for p in hits.passages], hits.trimmed


@pytest.fixture
async def other(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    """A second handle on the same file: another process, as far as the index can tell."""
    other = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await other.open()
    yield other
    await other.close()


async def test_text_ranking_equals_fts5_bm25(index: SqliteKnowledgeIndex, tmp_path: Path) -> None:
    await _fill(index, seed=5, documents=120)
    for caller in CALLERS:
        for text in QUERIES:
            expected, expected_trimmed = _fts_ranking(tmp_path / "knowledge.db", text, caller, 25)
            ranked, trimmed = await _ranking(index, tmp_path / "knowledge.db", text, caller, 25)
            # The same doubles, not merely the same order: the formula is FTS5's.
            assert ranked == expected, (text, caller)
            assert trimmed == expected_trimmed, (text, caller)
    assert any(_fts_ranking(tmp_path / "knowledge.db", "handbook", c, 5)[0] for c in CALLERS)


async def test_a_term_fts5_splits_is_searched_as_a_phrase(index: SqliteKnowledgeIndex) -> None:
    # "\\w+" keeps "rota_audit" whole; FTS5's tokenizer reads two tokens, a phrase.
    await put(index, "a", make_chunks("a", "rota audit every week", acl=access(public=True)))
    await put(index, "b", make_chunks("b", "audit of the rota", acl=access(public=True)))
    await put(index, "c", make_chunks("c", "rota audit for finance", acl=access(groups=["x"])))
    reader = caller_filter("contoso", "reader@contoso.com")
    hits = await index.search(SearchRequest("rota_audit", 5, SearchMode.TEXT), reader)
    assert [p.chunk.chunk_id for p in hits.passages] == ["a-0"]
    assert hits.trimmed == 1


async def test_long_query_words_are_searched_but_not_cached(index: SqliteKnowledgeIndex) -> None:
    long_word = "x" * 5_000
    await put(index, "a", make_chunks("a", f"rota {long_word}", acl=access(public=True)))
    await put(index, "b", make_chunks("b", "rota audit", acl=access(public=True)))
    reader = caller_filter("contoso", "reader@contoso.com")
    for _ in range(2):
        hits = await index.search(SearchRequest(f"{long_word} audit", 5, SearchMode.TEXT), reader)
        # Each document matches one of the two words.
        assert {p.chunk.chunk_id for p in hits.passages} == {"a-0", "b-0"}
    # The caches hold the short word only: their bounds are counts of terms and rows.
    assert "audit" in index._tokenized
    assert long_word not in index._tokenized
    assert "audit" in index._postings
    assert long_word not in index._postings


async def test_words_found_nowhere_do_not_grow_the_postings_cache_without_bound(
    index: SqliteKnowledgeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "_TOKENIZED_TERMS", 3)
    await put(index, "a", make_chunks("a", "rota audit", acl=access(public=True)))
    reader = caller_filter("contoso", "reader@contoso.com")
    for n in range(10):
        # A made-up word has no postings, so it adds nothing to the count of rows.
        await index.search(SearchRequest(f"rota zq{n}", 5, SearchMode.TEXT), reader)
        assert len(index._postings) <= 3
    hits = await index.search(SearchRequest("rota", 5, SearchMode.TEXT), reader)
    assert [p.chunk.chunk_id for p in hits.passages] == ["a-0"]


async def test_a_full_term_cache_is_cleared_without_losing_the_query_s_terms(
    index: SqliteKnowledgeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "_TOKENIZED_TERMS", 2)
    await put(index, "a", make_chunks("a", "rota audit", acl=access(public=True)))
    await put(index, "b", make_chunks("b", "falcon budget", acl=access(public=True)))
    reader = caller_filter("contoso", "reader@contoso.com")
    await index.search(SearchRequest("rota", 5, SearchMode.TEXT), reader)
    # "rota" is cached; two new terms overflow the bound, which clears the cache.
    hits = await index.search(SearchRequest("rota falcon budget", 5, SearchMode.TEXT), reader)
    assert {p.chunk.chunk_id for p in hits.passages} == {"a-0", "b-0"}
    assert set(index._tokenized) == {"falcon", "budget"}


async def test_own_writes_update_the_arrays_as_a_reload_would(
    index: SqliteKnowledgeIndex, tmp_path: Path
) -> None:
    path = tmp_path / "knowledge.db"
    embedder = HashingEmbedder()
    writer = index
    rng = random.Random(11)

    async def both_agree() -> None:
        fresh = SqliteKnowledgeIndex(path)
        await fresh.open()
        try:
            for caller in CALLERS:
                for text in QUERIES[:5]:
                    for mode in SearchMode:
                        (vector,) = await embedder.embed([text], tenant_id="contoso")
                        request = SearchRequest(
                            text, 10, mode, vector=vector, embedding=embedder.identity
                        )
                        mine = await writer.search(request, caller)
                        loaded = await fresh.search(request, caller)
                        assert mine == loaded, (text, mode, caller)
                        assert all(caller.allows(p.chunk.access) for p in mine.passages)
        finally:
            await fresh.close()

    for n in range(12):
        texts = [" ".join(rng.choices(WORDS, k=8)) for _ in range(3)]
        await put(
            writer, f"d{n}", make_chunks(f"d{n}", *texts, acl=_random_access(rng, n)), embedder
        )
    await both_agree()  # the first search loads the arrays
    # Replaced (ids reused at the end), re-permissioned, deleted, added: each applied
    # to the arrays in memory, several at a time between searches.
    await put(
        writer, "d11", make_chunks("d11", "falcon kestrel", acl=access(public=True)), embedder
    )
    await both_agree()
    assert await writer.update_access("d3", access(groups=["nobody-has-this"]))
    await both_agree()
    await writer.delete_document("d0")
    await put(writer, "d5", make_chunks("d5", "running leave", acl=access(groups=["hr"])), embedder)
    await put(
        writer, "new", make_chunks("new", "falcon audit", acl=access(groups=["sales"])), embedder
    )
    assert await writer.update_access("new", access(groups=["finance"]))
    await both_agree()


async def test_another_processes_write_is_seen(
    index: SqliteKnowledgeIndex, other: SqliteKnowledgeIndex
) -> None:
    reader_index = index
    hr = caller_filter("contoso", "alice@contoso.com", "hr")
    await put(other, "memo", make_chunks("memo", "falcon budget", acl=access(groups=["hr"])))
    hits = await reader_index.search(SearchRequest("falcon", 5, SearchMode.TEXT), hr)
    assert [p.chunk.chunk_id for p in hits.passages] == ["memo-0"]
    # Revoked elsewhere: the next search must not rank it from stale arrays.
    assert await other.update_access("memo", access(groups=["finance"]))
    hits = await reader_index.search(SearchRequest("falcon", 5, SearchMode.TEXT), hr)
    assert hits.passages == ()
    assert hits.trimmed == 1


def test_document_lengths_decode_sqlite_varints() -> None:
    # 5 | 127 | 128 = 0x81 0x00 | 300 = 0x82 0x2c | 16384 = 0x81 0x80 0x00
    sizes = [bytes([5, 0x7F]), bytes([0x81, 0x00, 0x82, 0x2C]), bytes([0x81, 0x80, 0x00]), b""]
    assert document_lengths(sizes).tolist() == [132, 428, 16384, 0]
