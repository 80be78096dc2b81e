"""Security-trimmed retrieval over any :class:`~knowledge.contracts.KnowledgeIndex`."""

from __future__ import annotations

import logging
from typing import NoReturn

from knowledge.contracts import (
    AccessFilter,
    AccessScope,
    Chunk,
    Embedder,
    EmbeddingMismatch,
    IndexUnavailable,
    KnowledgeCaller,
    KnowledgeIndex,
    RetrievalQuery,
    RetrievalResult,
    SearchMode,
    SearchRequest,
)
from knowledge.telemetry import retrieving

_log = logging.getLogger(__name__)


class SecurityTrimmedRetriever:
    """The :class:`~knowledge.contracts.Retriever` the intelligence layer talks to.

    The index applies the caller's :class:`AccessFilter` inside its query. This
    class re-checks every chunk the index returns against the same rule: a
    chunk that fails means the backend is broken, so the whole call fails
    closed with :class:`IndexUnavailable` rather than return anything from it.

    Vector and hybrid queries are embedded here (metered to the caller's tenant) by
    ``embedder``; without one, a hybrid query is a text query. Whether the index holds
    vectors is the index's to say: another process may have written the first ones
    since this one last looked, so the query goes with its vector and the index ranks
    hybrid by text alone while it has none. A vector query the index's model did not
    make is refused (:class:`~knowledge.contracts.EmbeddingMismatch`), here already when
    the index's known model differs, never answered with garbage.

    Each retrieval is a ``lamina.retrieve`` span with its counts
    (:mod:`knowledge.telemetry`); ``capture_content`` adds the query text to it.
    """

    def __init__(
        self,
        index: KnowledgeIndex,
        embedder: Embedder | None = None,
        *,
        default_mode: SearchMode = SearchMode.HYBRID,
        capture_content: bool = False,
    ) -> None:
        self._index = index
        self._embedder = embedder
        self._default_mode = default_mode
        self._capture_content = capture_content

    async def _request(self, query: RetrievalQuery, tenant_id: str) -> SearchRequest:
        mode = query.mode or self._default_mode
        if mode is SearchMode.HYBRID and self._embedder is None:
            mode = SearchMode.TEXT
        if mode is SearchMode.TEXT:
            return SearchRequest(query.text, query.top_k, mode)
        if self._embedder is None:
            raise IndexUnavailable("vector search is not configured: no embedding model")
        built_by = self._index.embedding
        if built_by is not None and built_by != self._embedder.identity:
            raise EmbeddingMismatch(
                f"the knowledge index was built with embedding model {built_by.model} "
                f"({built_by.dimensions} dimensions), but queries are embedded with "
                f"{self._embedder.identity.model} ({self._embedder.identity.dimensions}): "
                f"configure {built_by.model}, or re-index"
            )
        (vector,) = await self._embedder.embed([query.text], tenant_id=tenant_id)
        return SearchRequest(
            query.text, query.top_k, mode, vector=vector, embedding=self._embedder.identity
        )

    async def retrieve(self, query: RetrievalQuery, caller: KnowledgeCaller) -> RetrievalResult:
        access = AccessFilter.for_caller(caller)
        with retrieving(
            index=self._index.name,
            top_k=query.top_k,
            tenant_id=caller.tenant_id,
            query=query.text if self._capture_content else None,
        ) as retrieval:
            hits = await self._index.search(await self._request(query, caller.tenant_id), access)
            passages, trimmed = hits.passages, hits.trimmed
            leaked = [p.chunk.chunk_id for p in passages if not access.allows(p.chunk.access)]
            if leaked:
                self._report_violation(leaked)
            returned = passages[: query.top_k]
            retrieval.found(
                candidates=len(passages) + trimmed, trimmed=trimmed, returned=len(returned)
            )
            return RetrievalResult(
                passages=tuple(returned), index=self._index.name, trimmed_count=trimmed
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
