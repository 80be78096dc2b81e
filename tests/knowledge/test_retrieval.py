from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from knowledge.contracts import (
    AccessFilter,
    Chunk,
    IndexUnavailable,
    RetrievalQuery,
    RetrievedPassage,
)
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.knowledge.factories import Caller, access, make_chunks

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
    searches: list[tuple[str, AccessFilter, int]] = field(default_factory=list)
    lookups: list[tuple[str, AccessFilter]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "scripted"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def replace_document(self, document_id: str, chunks: Sequence[Chunk]) -> None:
        raise NotImplementedError("the scripted index is read-only: retrieval tests never write")

    async def delete_document(self, document_id: str) -> None:
        raise NotImplementedError("the scripted index is read-only: retrieval tests never write")

    async def search(
        self, text: str, access: AccessFilter, top_k: int
    ) -> tuple[list[RetrievedPassage], int]:
        self.searches.append((text, access, top_k))
        return list(self.passages), self.trimmed

    async def get_chunk(self, chunk_id: str, access: AccessFilter) -> Chunk | None:
        self.lookups.append((chunk_id, access))
        return self.chunk

    async def count_chunks(self) -> int:
        return len(self.passages)


async def test_retrieve_passes_the_callers_filter_and_reports_the_index() -> None:
    index = ScriptedIndex(passages=[RetrievedPassage(HR_CHUNK, 2.5)], trimmed=3)
    retriever = SecurityTrimmedRetriever(index)

    result = await retriever.retrieve(RetrievalQuery("annual leave", top_k=4), ALICE)

    assert index.searches == [
        ("annual leave", AccessFilter("contoso", "alice@contoso.com", frozenset({"hr"})), 4)
    ]
    assert result.passages == (RetrievedPassage(HR_CHUNK, 2.5),)
    assert result.index == "scripted"
    assert result.trimmed_count == 3


async def test_retrieve_never_returns_more_than_top_k() -> None:
    index = ScriptedIndex(
        passages=[RetrievedPassage(HR_CHUNK, 2.0), RetrievedPassage(SECOND_HR_CHUNK, 1.0)]
    )
    result = await SecurityTrimmedRetriever(index).retrieve(RetrievalQuery("x", top_k=1), ALICE)
    assert [p.chunk for p in result.passages] == [HR_CHUNK]


async def test_a_backend_that_leaks_a_forbidden_chunk_fails_the_whole_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = ScriptedIndex(passages=[RetrievedPassage(HR_CHUNK, 3.0), RetrievedPassage(SECRET, 2.0)])
    retriever = SecurityTrimmedRetriever(index)

    with caplog.at_level(logging.ERROR), pytest.raises(IndexUnavailable):
        await retriever.retrieve(RetrievalQuery("falcon"), ALICE)

    assert SECRET.chunk_id in caplog.text
    assert "Falcon" not in caplog.text  # the log names the chunk, never its content


async def test_a_chunk_from_another_tenant_is_a_leak_too() -> None:
    foreign = replace(HR_CHUNK, access=access("fabrikam", groups=["hr"]))
    index = ScriptedIndex(passages=[RetrievedPassage(foreign, 1.0)])
    with pytest.raises(IndexUnavailable):
        await SecurityTrimmedRetriever(index).retrieve(RetrievalQuery("leave"), ALICE)


async def test_get_chunk_returns_a_permitted_chunk() -> None:
    index = ScriptedIndex(chunk=HR_CHUNK)
    assert await SecurityTrimmedRetriever(index).get_chunk(HR_CHUNK.chunk_id, ALICE) == HR_CHUNK
    assert index.lookups == [(HR_CHUNK.chunk_id, AccessFilter.for_caller(ALICE))]


async def test_get_chunk_of_an_absent_or_hidden_chunk_is_none() -> None:
    assert await SecurityTrimmedRetriever(ScriptedIndex()).get_chunk("memo-0", ALICE) is None


@pytest.mark.parametrize(
    ("asked", "returned"),
    [(SECRET.chunk_id, SECRET), (HR_CHUNK.chunk_id, SECOND_HR_CHUNK)],
    ids=["forbidden", "wrong-chunk"],
)
async def test_get_chunk_fails_closed_when_the_backend_misbehaves(
    asked: str, returned: Chunk
) -> None:
    with pytest.raises(IndexUnavailable):
        await SecurityTrimmedRetriever(ScriptedIndex(chunk=returned)).get_chunk(asked, ALICE)
