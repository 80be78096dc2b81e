"""Security-trimmed retrieval over any :class:`~knowledge.contracts.KnowledgeIndex`."""

from __future__ import annotations

import logging
from typing import NoReturn

from knowledge.contracts import (
    AccessFilter,
    AccessScope,
    Chunk,
    IndexUnavailable,
    KnowledgeCaller,
    KnowledgeIndex,
    RetrievalQuery,
    RetrievalResult,
)

_log = logging.getLogger(__name__)


class SecurityTrimmedRetriever:
    """The :class:`~knowledge.contracts.Retriever` the intelligence layer talks to.

    The index applies the caller's :class:`AccessFilter` inside its query. This
    class re-checks every chunk the index returns against the same rule: a
    chunk that fails means the backend is broken, so the whole call fails
    closed with :class:`IndexUnavailable` rather than return anything from it.
    """

    def __init__(self, index: KnowledgeIndex) -> None:
        self._index = index

    async def retrieve(self, query: RetrievalQuery, caller: KnowledgeCaller) -> RetrievalResult:
        access = AccessFilter.for_caller(caller)
        passages, trimmed = await self._index.search(query.text, access, query.top_k)
        leaked = [p.chunk.chunk_id for p in passages if not access.allows(p.chunk.access)]
        if leaked:
            self._report_violation(leaked)
        return RetrievalResult(
            passages=tuple(passages[: query.top_k]), index=self._index.name, trimmed_count=trimmed
        )

    async def get_chunk(self, chunk_id: str, caller: KnowledgeCaller) -> Chunk | None:
        access = AccessFilter.for_caller(caller)
        chunk = await self._index.get_chunk(chunk_id, access)
        if chunk is None:
            return None
        if chunk.chunk_id != chunk_id or not access.allows(chunk.access):
            self._report_violation([chunk.chunk_id])
        return chunk

    async def access_scope(self, caller: KnowledgeCaller) -> AccessScope:
        return await self._index.access_scope(AccessFilter.for_caller(caller))

    def _report_violation(self, chunk_ids: list[str]) -> NoReturn:
        # Ids only: the log must not carry the content the caller was denied.
        _log.error(
            "index %s returned chunks outside the caller's access: %s", self._index.name, chunk_ids
        )
        raise IndexUnavailable("the knowledge index returned an inconsistent result")
