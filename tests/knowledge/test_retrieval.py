from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import pytest

from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import (
    AccessFilter,
    AccessScope,
    Chunk,
    EmbeddingIdentity,
    EmbeddingMismatch,
    IndexUnavailable,
    KnowledgeIndex,
    RetrievalQuery,
    RetrievedPassage,
    SearchHits,
    SearchMode,
    SearchRequest,
)
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.knowledge.factories import Caller, ConstantEmbedder, HashingEmbedder, access, make_chunks
from tests.knowledge.index_contract import put

ALICE = Caller("contoso", "alice@contoso.com", frozenset({"hr"}))
HR_CHUNK, SECOND_HR_CHUNK = make_chunks(
    "hr", "leave: 27 days", "carry over 5", acl=access(groups=["hr"])
)
(SECRET,) = make_chunks("memo", "Project Falcon: USD 4.85 million", acl=access(groups=["finance"]))


@dataclass
class ScriptedIndex:
    """Returns whatever it is told to, ACL or not, and records what it was asked."""

    passages: list[RetrievedPassage] = field(default_factory=list)
    trimmed: int = 0
    chunk: Chunk | None = None
    embedding: EmbeddingIdentity | None = None
    searches: list[tuple[SearchRequest, AccessFilter]] = field(default_factory=list)
    lookups: list[tuple[str, AccessFilter]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "scripted"

    async def search(self, request: SearchRequest, access: AccessFilter) -> SearchHits:
        self.searches.append((request, access))
        return SearchHits(tuple(self.passages), self.trimmed)

    async def get_chunk(self, chunk_id: str, access: AccessFilter) -> Chunk | None:
        self.lookups.append((chunk_id, access))
        return self.chunk

    async def access_scope(self, access: AccessFilter) -> AccessScope:
        return AccessScope("f", "g")


def trimmed_retriever(
    index: ScriptedIndex, embedder: HashingEmbedder | None = None
) -> SecurityTrimmedRetriever:
    # The retriever reads only name, embedding, search, get_chunk and access_scope.
    return SecurityTrimmedRetriever(cast("KnowledgeIndex", index), embedder)


async def test_retrieve_passes_the_callers_filter_and_reports_the_index() -> None:
    index = ScriptedIndex(passages=[RetrievedPassage(HR_CHUNK, 2.5)], trimmed=3)
    subject = trimmed_retriever(index)

    result = await subject.retrieve(RetrievalQuery("annual leave", top_k=4), ALICE)

    assert index.searches == [
        (
            SearchRequest("annual leave", 4, SearchMode.TEXT),
            AccessFilter("contoso", "alice@contoso.com", frozenset({"hr"})),
        )
    ]
    assert result.passages == (RetrievedPassage(HR_CHUNK, 2.5),)
    assert result.index == "scripted"
    assert result.trimmed_count == 3


async def test_retrieve_never_returns_more_than_top_k() -> None:
    index = ScriptedIndex(
        passages=[RetrievedPassage(HR_CHUNK, 2.0), RetrievedPassage(SECOND_HR_CHUNK, 1.0)]
    )
    result = await trimmed_retriever(index).retrieve(RetrievalQuery("x", top_k=1), ALICE)
    assert [p.chunk for p in result.passages] == [HR_CHUNK]


async def test_a_backend_that_leaks_a_forbidden_chunk_fails_the_whole_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = ScriptedIndex(passages=[RetrievedPassage(HR_CHUNK, 3.0), RetrievedPassage(SECRET, 2.0)])
    subject = trimmed_retriever(index)

    with caplog.at_level(logging.ERROR), pytest.raises(IndexUnavailable):
        await subject.retrieve(RetrievalQuery("falcon"), ALICE)

    assert SECRET.chunk_id in caplog.text
    assert "Falcon" not in caplog.text  # the log names the chunk, never its content


async def test_a_chunk_from_another_tenant_is_a_leak_too() -> None:
    foreign = replace(HR_CHUNK, access=access("fabrikam", groups=["hr"]))
    index = ScriptedIndex(passages=[RetrievedPassage(foreign, 1.0)])
    with pytest.raises(IndexUnavailable):
        await trimmed_retriever(index).retrieve(RetrievalQuery("leave"), ALICE)


async def test_get_chunk_returns_a_permitted_chunk() -> None:
    index = ScriptedIndex(chunk=HR_CHUNK)
    assert await trimmed_retriever(index).get_chunk(HR_CHUNK.chunk_id, ALICE) == HR_CHUNK
    assert index.lookups == [(HR_CHUNK.chunk_id, AccessFilter.for_caller(ALICE))]


async def test_get_chunk_of_an_absent_or_hidden_chunk_is_none() -> None:
    assert await trimmed_retriever(ScriptedIndex()).get_chunk("memo-0", ALICE) is None


@pytest.mark.parametrize(
    ("asked", "returned"),
    [(SECRET.chunk_id, SECRET), (HR_CHUNK.chunk_id, SECOND_HR_CHUNK)],
    ids=["forbidden", "wrong-chunk"],
)
async def test_get_chunk_fails_closed_when_the_backend_misbehaves(
    asked: str, returned: Chunk
) -> None:
    with pytest.raises(IndexUnavailable):
        await trimmed_retriever(ScriptedIndex(chunk=returned)).get_chunk(asked, ALICE)


async def test_hybrid_queries_are_embedded_for_the_callers_tenant() -> None:
    embedder = HashingEmbedder(32)
    index = ScriptedIndex(embedding=embedder.identity)
    await trimmed_retriever(index, embedder).retrieve(RetrievalQuery("annual leave"), ALICE)
    ((request, _),) = index.searches
    assert request.mode is SearchMode.HYBRID
    assert request.embedding == embedder.identity
    assert request.vector is not None and len(request.vector) == 32
    assert embedder.calls == [(("annual leave",), "contoso")]


async def test_hybrid_without_an_embedder_is_a_text_search() -> None:
    index = ScriptedIndex()
    await trimmed_retriever(index).retrieve(RetrievalQuery("annual leave"), ALICE)
    assert [request.mode for request, _ in index.searches] == [SearchMode.TEXT]


async def test_hybrid_goes_with_its_vector_even_before_the_index_has_shown_any() -> None:
    # The index may have been given vectors by another process: it decides, not the retriever.
    embedder = HashingEmbedder(32)
    index = ScriptedIndex(embedding=None)
    await trimmed_retriever(index, embedder).retrieve(RetrievalQuery("annual leave"), ALICE)
    ((request, _),) = index.searches
    assert request.mode is SearchMode.HYBRID
    assert request.embedding == embedder.identity
    assert request.vector is not None


async def test_hybrid_uses_vectors_another_process_wrote_after_the_server_opened(
    tmp_path: Path,
) -> None:
    embedder = ConstantEmbedder(32)
    server = SqliteKnowledgeIndex(tmp_path / "k.db")
    await server.open()
    ingest = SqliteKnowledgeIndex(tmp_path / "k.db")
    await ingest.open()
    try:
        retriever = SecurityTrimmedRetriever(server, embedder)
        assert (
            await retriever.retrieve(RetrievalQuery("parental allowance"), ALICE)
        ).passages == ()

        chunks = make_chunks("policy", "leave: 27 days", acl=access(groups=["hr"]))
        await put(ingest, "policy", chunks, embedder)

        # No word in common with the chunk: only its vector can find it.
        result = await retriever.retrieve(RetrievalQuery("parental allowance"), ALICE)
        assert [p.chunk.chunk_id for p in result.passages] == ["policy-0"]
    finally:
        await ingest.close()
        await server.close()


async def test_a_query_model_other_than_the_indexs_is_refused_before_embedding() -> None:
    embedder = HashingEmbedder(32)
    index = ScriptedIndex(embedding=EmbeddingIdentity("all-MiniLM-L6-v2-int8", 384))
    with pytest.raises(EmbeddingMismatch, match="all-MiniLM-L6-v2-int8"):
        await trimmed_retriever(index, embedder).retrieve(
            RetrievalQuery("leave", mode=SearchMode.VECTOR), ALICE
        )
    assert embedder.calls == []
    assert index.searches == []
