"""Azure AI Search index backend: hybrid (BM25 + HNSW vectors, fused by the service with
Reciprocal Rank Fusion), an optional semantic ranker, and the ACL as an OData filter.

Security trimming. Every query carries a filter built here from the validated caller
identity and nothing else::

    kind eq 'chunk' and tenant_id eq '<tenant>' and (public eq true
        or user_ids/any(u: u eq '<user>')
        or group_ids/any(g: search.in(g, '<g1>|<g2>', '|')))

The service applies it inside the text search and, with ``vectorFilterMode``
``preFilter``, inside the HNSW search, so a forbidden chunk never takes a top-k slot.
Literals are OData-escaped (a single quote doubled); ``search.in`` gets a delimiter
that occurs in none of the caller's group names (groups containing every candidate
delimiter are compared one by one with ``eq``). A caller without a tenant, or with
neither a user id nor a group, is denied without a request. Any failure of the
service is :class:`IndexUnavailable`: never results without the filter.

Documents of three kinds share the index: ``chunk`` (searchable), ``index`` (one
document recording the embedding identity that built the vectors) and ``tenant`` (one
per tenant, whose random ``generation`` moves with every write to the tenant's chunks,
including writes by other processes). Keys are the URL-safe base64 of the chunk id,
since a key may hold only letters, digits, ``_``, ``-`` and ``=``.

Azure AI Search has no transactions: ``replace_document`` uploads the new chunks, then
deletes the old ones that were not overwritten, so an interrupted replacement leaves the
new chunks and, at worst, stale ones that the next replacement removes. The tenant's
generation moves before a write as well as after it, so a write that fails part-way still
invalidates the caches; and ``documents()`` reports an empty content hash for a document
whose chunks disagree on their hash or ACL, so the next ingest rewrites all of it. New
documents become searchable about a second after the upload (the service refreshes near
real time).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from azure.core.credentials import AzureKeyCredential
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.search.documents import IndexDocumentsBatch
from azure.search.documents.aio import SearchClient
from azure.search.documents.indexes.aio import SearchIndexClient
from azure.search.documents.indexes.models import (
    HnswAlgorithmConfiguration,
    HnswParameters,
    SearchField,
    SearchFieldDataType,
    SearchIndex,
    SemanticConfiguration,
    SemanticField,
    SemanticPrioritizedFields,
    SemanticSearch,
    SimpleField,
    VectorSearch,
    VectorSearchProfile,
)
from azure.search.documents.models import IndexingResult, VectorizedQuery

from knowledge.contracts import (
    AccessControl,
    AccessFilter,
    AccessScope,
    Chunk,
    DocumentState,
    EmbeddingIdentity,
    EmbeddingMismatch,
    IndexUnavailable,
    RetrievedPassage,
    SearchHits,
    SearchMode,
    SearchRequest,
    check_document_write,
)
from knowledge.settings import AzureSearchSettings

T = TypeVar("T")

VECTOR_PROFILE = "lamina-hnsw"
SEMANTIC_CONFIGURATION = "lamina-semantic"
_HNSW = "lamina-hnsw-cosine"
_INDEX_KEY = "lamina-index"
_RETRYABLE = frozenset({429, 503})
_RETRYABLE_DOCUMENT = frozenset({409, 422, 429, 503})
"""Per-document statuses the service documents as transient (a concurrent write, a busy
replica, throttling): retried with the same backoff as whole requests."""
_DELIMITERS = ("|", ",", ";", "\x1f", "\x1e")
_PAGE = 1000
"""Documents per page when listing (the service's maximum ``top``)."""
_FACET_CAP = 1000
_HYBRID_CANDIDATES = 50
"""Nearest neighbours fed to fusion in hybrid mode: more than ``top_k`` so that fusion
can promote a chunk ranked well by text and moderately by vector."""
_CHUNK_FIELDS = [
    "chunk_id",
    "document_id",
    "content",
    "source",
    "title",
    "page",
    "section",
    "ordinal",
    "tenant_id",
    "user_ids",
    "group_ids",
    "public",
]
_WORD = re.compile(r"\w+")


def document_key(chunk_id: str) -> str:
    """The index key of a chunk: URL-safe base64 of its id (ids may hold any character)."""
    return "c" + base64.urlsafe_b64encode(chunk_id.encode()).decode()


def _tenant_key(tenant_id: str) -> str:
    return "t" + base64.urlsafe_b64encode(tenant_id.encode()).decode()


def odata_literal(value: str) -> str:
    """An OData string literal: quoted, with each single quote doubled."""
    return "'" + value.replace("'", "''") + "'"


def security_filter(access: AccessFilter) -> str | None:
    """The OData filter that admits exactly the chunks ``access`` may read, or ``None``
    when the caller may read nothing (no tenant, or neither a user id nor a group)."""
    groups = sorted(group for group in access.groups if group)
    if not access.tenant_id or not (access.user_id or groups):
        return None
    grants = ["public eq true"]
    if access.user_id:
        grants.append(f"user_ids/any(u: u eq {odata_literal(access.user_id)})")
    if groups:
        grants.append(_group_clause(groups))
    return f"{_tenant_filter(access.tenant_id)} and ({' or '.join(grants)})"


def _group_clause(groups: Sequence[str]) -> str:
    delimiter = next((d for d in _DELIMITERS if not any(d in g for g in groups)), None)
    if delimiter is None:
        # search.in has no escape for its delimiters: compare such names one by one.
        alternatives = " or ".join(f"g eq {odata_literal(g)}" for g in groups)
        return f"group_ids/any(g: {alternatives})"
    listed = odata_literal(delimiter.join(groups))
    return f"group_ids/any(g: search.in(g, {listed}, {odata_literal(delimiter)}))"


def _tenant_filter(tenant_id: str) -> str:
    return f"kind eq 'chunk' and tenant_id eq {odata_literal(tenant_id)}"


def search_terms(text: str) -> str:
    """The words of ``text``, space-separated: the query syntax's operators (``+ | - " *
    ( ) ~``) become plain separators, so no user input is ever parsed as an operator."""
    return " ".join(_WORD.findall(text))


def index_schema(name: str, dimensions: int) -> SearchIndex:
    """The index definition: filterable ACL fields, an HNSW (cosine) vector field of
    ``dimensions``, and a semantic configuration over title and content."""
    string = SearchFieldDataType.String
    strings = SearchFieldDataType.Collection(SearchFieldDataType.String)
    fields = [
        SimpleField(name="id", type=string, key=True, sortable=True),
        SimpleField(name="kind", type=string, filterable=True),
        SimpleField(name="chunk_id", type=string, filterable=True),
        SimpleField(name="document_id", type=string, filterable=True),
        SearchField(name="content", type=string, searchable=True),
        SearchField(name="title", type=string, searchable=True),
        SimpleField(name="source", type=string, filterable=True),
        SimpleField(name="page", type=SearchFieldDataType.Int32),
        SimpleField(name="section", type=string),
        SimpleField(name="ordinal", type=SearchFieldDataType.Int32),
        SimpleField(name="tenant_id", type=string, filterable=True),
        SimpleField(name="user_ids", type=strings, filterable=True),
        SimpleField(name="group_ids", type=strings, filterable=True, facetable=True),
        SimpleField(name="public", type=SearchFieldDataType.Boolean, filterable=True),
        SimpleField(name="content_hash", type=string),
        SimpleField(name="embedding_model", type=string),
        SimpleField(name="embedding_dimensions", type=SearchFieldDataType.Int32),
        SimpleField(name="generation", type=string),
        SearchField(
            name="vector",
            type=SearchFieldDataType.Collection(SearchFieldDataType.Single),
            searchable=True,
            hidden=True,
            vector_search_dimensions=dimensions,
            vector_search_profile_name=VECTOR_PROFILE,
        ),
    ]
    return SearchIndex(
        name=name,
        fields=fields,
        vector_search=VectorSearch(
            profiles=[VectorSearchProfile(name=VECTOR_PROFILE, algorithm_configuration_name=_HNSW)],
            algorithms=[
                HnswAlgorithmConfiguration(name=_HNSW, parameters=HnswParameters(metric="cosine"))
            ],
        ),
        semantic_search=SemanticSearch(
            configurations=[
                SemanticConfiguration(
                    name=SEMANTIC_CONFIGURATION,
                    prioritized_fields=SemanticPrioritizedFields(
                        title_field=SemanticField(field_name="title"),
                        content_fields=[SemanticField(field_name="content")],
                    ),
                )
            ]
        ),
    )


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The wait a throttling answer asks for (``retry-after-ms``, ``x-ms-retry-after-ms``,
    or ``Retry-After`` in seconds or as an HTTP date), if any."""
    if headers is None:
        return None
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        if value := headers.get(name):
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Stored:
    key: str
    tenant_id: str


class AzureSearchKnowledgeIndex:
    """A :class:`~knowledge.contracts.KnowledgeIndex` over one Azure AI Search index."""

    def __init__(
        self,
        endpoint: str,
        index_name: str,
        *,
        credential: AzureKeyCredential | AsyncTokenCredential,
        embedding: EmbeddingIdentity,
        semantic_ranker: bool = False,
        vector_weight: float = 1.0,
        batch_size: int = 500,
        max_retries: int = 5,
        retry_backoff: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connection_verify: bool | str = True,
    ) -> None:
        """``embedding`` is the configured model: it sizes the vector field of a new index
        (an existing index keeps its own and records which model built it).
        ``sleep`` waits between retries (tests pass one that records the waits);
        ``connection_verify`` may name a CA file, for a service behind a private CA.
        ``vector_weight`` weighs the vector query in the service's Reciprocal Rank Fusion
        of a hybrid search (1: both lists count alike)."""
        self._endpoint = endpoint
        self._index_name = index_name
        self._credential = credential
        self._configured = embedding
        self._semantic_ranker = semantic_ranker
        self._vector_weight = vector_weight
        self._batch_size = batch_size
        self._max_retries = max_retries
        self._retry_backoff = retry_backoff
        self._sleep = sleep
        self._dimensions = embedding.dimensions
        self._embedding: EmbeddingIdentity | None = None
        self._search: SearchClient | None = None
        self._owned_credential: AsyncTokenCredential | None = None
        # Status retries are ours (with jitter, and for POSTs too); the SDK's
        # pipeline keeps retrying connection errors.
        self._options: dict[str, Any] = {"retry_status": 0, "connection_verify": connection_verify}

    @classmethod
    def from_settings(
        cls,
        settings: AzureSearchSettings,
        embedding: EmbeddingIdentity,
        *,
        credential: AsyncTokenCredential | None = None,
        connection_verify: bool | str = True,
    ) -> AzureSearchKnowledgeIndex:
        """Authenticate with the API key when one is set, else with ``credential`` or,
        by default, Entra ID through ``DefaultAzureCredential`` (managed identity)."""
        if not settings.endpoint:
            raise ValueError(
                "LAMINA_KNOWLEDGE__AZURE_SEARCH__ENDPOINT must be set to use the "
                "azure_search backend (https://<service>.search.windows.net)"
            )
        chosen: AzureKeyCredential | AsyncTokenCredential
        owned: AsyncTokenCredential | None = None
        if settings.api_key is not None:
            chosen = AzureKeyCredential(settings.api_key.get_secret_value())
        elif credential is not None:
            chosen = credential
        else:
            from azure.identity.aio import DefaultAzureCredential

            chosen = owned = DefaultAzureCredential()
        index = cls(
            settings.endpoint,
            settings.index_name,
            credential=chosen,
            embedding=embedding,
            semantic_ranker=settings.semantic_ranker,
            vector_weight=settings.vector_weight,
            batch_size=settings.batch_size,
            max_retries=settings.max_retries,
            connection_verify=connection_verify,
        )
        index._owned_credential = owned
        return index

    @property
    def name(self) -> str:
        return "azure-ai-search"

    @property
    def embedding(self) -> EmbeddingIdentity | None:
        return self._embedding

    # --- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        """Create or update the index schema and read the recorded embedding identity."""
        if self._search is not None:
            return
        async with SearchIndexClient(self._endpoint, self._credential, **self._options) as indexes:
            try:
                existing = await self._retrying(lambda: indexes.get_index(self._index_name))
            except ResourceNotFoundError:
                existing = None
            except AzureError as error:
                raise self._unavailable(error) from error
            if existing is not None:
                vector = next((f for f in existing.fields or [] if f.name == "vector"), None)
                if vector is not None and vector.vector_search_dimensions:
                    self._dimensions = vector.vector_search_dimensions
            schema = index_schema(self._index_name, self._dimensions)
            await self._guard(lambda: indexes.create_or_update_index(schema))
        self._search = SearchClient(
            self._endpoint, self._index_name, self._credential, **self._options
        )
        self._embedding = await self._recorded_embedding()

    async def close(self) -> None:
        if self._search is not None:
            await self._search.close()
            self._search = None
        if self._owned_credential is not None:
            await self._owned_credential.close()
            self._owned_credential = None

    # --- writes ---------------------------------------------------------------

    async def replace_document(
        self,
        document_id: str,
        chunks: Sequence[Chunk],
        *,
        content_hash: str,
        vectors: Sequence[Sequence[float]] | None = None,
        embedding: EmbeddingIdentity | None = None,
    ) -> None:
        check_document_write(document_id, chunks, vectors, embedding)
        if vectors is not None and embedding is not None:
            await self._accept_vectors(embedding)
        stored = await self._stored_chunks(document_id)
        documents: list[dict[str, Any]] = []
        for position, chunk in enumerate(chunks):
            document = self._chunk_document(chunk, content_hash)
            if vectors is not None and embedding is not None:
                document["vector"] = [float(x) for x in vectors[position]]
                document["embedding_model"] = embedding.model
            documents.append(document)
        kept = {document["id"] for document in documents}
        stale = [{"id": s.key} for s in stored if s.key not in kept]
        tenants = {s.tenant_id for s in stored} | {c.access.tenant_id for c in chunks}
        await self._bump(tenants)
        await self._index_documents("mergeOrUpload", documents, f"document {document_id!r}")
        await self._index_documents("delete", stale, f"document {document_id!r}")
        await self._bump(tenants)

    async def update_access(self, document_id: str, access: AccessControl) -> bool:
        stored = await self._stored_chunks(document_id)
        if not stored:
            return False
        merges = [{"id": s.key, **_access_fields(access)} for s in stored]
        tenants = {s.tenant_id for s in stored} | {access.tenant_id}
        await self._bump(tenants)
        await self._index_documents("merge", merges, f"document {document_id!r}")
        await self._bump(tenants)
        return True

    async def delete_document(self, document_id: str) -> None:
        stored = await self._stored_chunks(document_id)
        tenants = {s.tenant_id for s in stored}
        await self._bump(tenants)
        await self._index_documents(
            "delete", [{"id": s.key} for s in stored], f"document {document_id!r}"
        )
        await self._bump(tenants)

    # --- reads ----------------------------------------------------------------

    async def documents(self, tenant_id: str, *, source_prefix: str = "") -> list[DocumentState]:
        rows = await self._all(
            _tenant_filter(tenant_id),
            [
                "document_id",
                "source",
                "content_hash",
                "tenant_id",
                "user_ids",
                "group_ids",
                "public",
            ],
        )
        states: dict[str, DocumentState] = {}
        for row in rows:
            if not str(row["source"]).startswith(source_prefix):
                continue
            document_id = str(row["document_id"])
            content_hash = str(row.get("content_hash") or "")
            access = _access_of(row)
            known = states.get(document_id)
            if known is not None and (known.content_hash, known.access) != (content_hash, access):
                # Chunks that disagree are the trace of a write that failed part-way: an
                # unknown hash makes the next ingest replace the whole document (and its
                # ACL) instead of trusting whichever chunk happened to come last.
                content_hash = ""
            states[document_id] = DocumentState(
                document_id=document_id,
                source=str(row["source"]),
                content_hash=content_hash,
                access=known.access if known is not None else access,
                chunks=(known.chunks if known else 0) + 1,
            )
        return sorted(states.values(), key=lambda state: state.source)

    async def search(self, request: SearchRequest, access: AccessFilter) -> SearchHits:
        vector: list[float] | None = None
        if request.mode is not SearchMode.TEXT:
            if request.vector is None:
                raise ValueError(f"{request.mode.value} search needs the query's vector")
            vector = list(request.vector)
        filter_ = security_filter(access)
        terms = search_terms(request.text)
        if filter_ is None or request.top_k <= 0:
            return SearchHits(passages=())
        if request.mode is not SearchMode.VECTOR and not terms:
            return SearchHits(passages=())
        if vector is not None:
            await self._check_query_embedding(request.embedding, len(vector))
        if vector is not None and self._embedding is None:
            # The index holds no vectors yet: a vector query has nothing to rank.
            if request.mode is SearchMode.VECTOR:
                return SearchHits(passages=())
            vector = None
        search_text = terms if request.mode is not SearchMode.VECTOR else None
        vector_queries = (
            [
                VectorizedQuery(
                    vector=vector,
                    k_nearest_neighbors=max(request.top_k, _HYBRID_CANDIDATES)
                    if search_text
                    else request.top_k,
                    fields="vector",
                    # Fusion weighs only a hybrid query's lists; 1 is the service's default.
                    weight=self._vector_weight
                    if search_text and self._vector_weight != 1
                    else None,
                )
            ]
            if vector is not None
            else None
        )
        semantic = self._semantic_ranker and bool(search_text)
        rows, trimmed = await asyncio.gather(
            self._query(
                search_text=search_text,
                filter=filter_,
                top=request.top_k,
                select=_CHUNK_FIELDS,
                vector_queries=vector_queries,
                vector_filter_mode="preFilter" if vector_queries else None,
                query_type="semantic" if semantic else None,
                semantic_configuration_name=SEMANTIC_CONFIGURATION if semantic else None,
            ),
            self._trimmed(terms, access.tenant_id, filter_),
        )
        passages = tuple(
            RetrievedPassage(
                chunk=_chunk_of(row),
                score=float(row.get("@search.rerankerScore") or row["@search.score"]),
            )
            for row in rows[: request.top_k]
        )
        return SearchHits(passages=passages, trimmed=trimmed)

    async def get_chunk(self, chunk_id: str, access: AccessFilter) -> Chunk | None:
        filter_ = security_filter(access)
        if filter_ is None:
            return None
        rows = await self._query(
            filter=f"{filter_} and chunk_id eq {odata_literal(chunk_id)}",
            top=1,
            select=_CHUNK_FIELDS,
        )
        return _chunk_of(rows[0]) if rows else None

    async def access_scope(self, access: AccessFilter) -> AccessScope:
        if security_filter(access) is None:
            return AccessScope.nothing(access.tenant_id, await self._generation(access.tenant_id))
        tenant = _tenant_filter(access.tenant_id)
        groups = sorted(group for group in access.groups if group)

        async def user_named() -> bool:
            if not access.user_id:
                return False
            user = f"user_ids/any(u: u eq {odata_literal(access.user_id)})"
            return await self._count(f"{tenant} and {user}") > 0

        async def groups_named() -> list[str]:
            if not groups:
                return []
            facets = await self._facets(
                f"{tenant} and {_group_clause(groups)}", f"group_ids,count:{_FACET_CAP}"
            )
            named = facets.get("group_ids", [])
            if len(named) >= _FACET_CAP:
                # Capped: count every group as named, which can only split a cache.
                return groups
            values = {str(entry.get("value")) for entry in named}
            return [group for group in groups if group in values]

        user, named_groups, generation = await asyncio.gather(
            user_named(), groups_named(), self._generation(access.tenant_id)
        )
        return AccessScope.of(
            access.tenant_id,
            users=[access.user_id] if user else [],
            groups=named_groups,
            generation=generation,
        )

    async def count_chunks(self) -> int:
        return await self._count("kind eq 'chunk'")

    # --- embedding identity ----------------------------------------------------

    async def _recorded_embedding(self) -> EmbeddingIdentity | None:
        row = await self._get(_INDEX_KEY)
        if row is None or not row.get("embedding_model"):
            return None
        return EmbeddingIdentity(str(row["embedding_model"]), int(row["embedding_dimensions"]))

    async def _accept_vectors(self, embedding: EmbeddingIdentity) -> None:
        if self._embedding is None:
            self._embedding = await self._recorded_embedding()
        if self._embedding is None:
            if embedding.dimensions != self._dimensions:
                raise EmbeddingMismatch(
                    f"the Azure AI Search index {self._index_name!r} stores "
                    f"{self._dimensions}-dimensional vectors, but {embedding.model!r} makes "
                    f"{embedding.dimensions}: use another index name or another model"
                )
            record = {
                "id": _INDEX_KEY,
                "kind": "index",
                "embedding_model": embedding.model,
                "embedding_dimensions": embedding.dimensions,
            }
            await self._index_documents("mergeOrUpload", [record], "the index record")
            self._embedding = embedding
        if embedding != self._embedding:
            raise EmbeddingMismatch(_mismatch(self._index_name, self._embedding, embedding))

    async def _check_query_embedding(
        self, embedding: EmbeddingIdentity | None, length: int
    ) -> None:
        """Refuse a query vector the index's model did not make. Another process may have
        written the first vectors, or rebuilt the index with another model, since this one
        last looked: unless the known identity already fits, it is read again first."""
        if self._fits(embedding, length):
            return
        self._embedding = await self._recorded_embedding()
        built = self._embedding
        if built is not None and not self._fits(embedding, length):
            asked = embedding or EmbeddingIdentity("an unnamed model", length)
            raise EmbeddingMismatch(_mismatch(self._index_name, built, asked))

    def _fits(self, embedding: EmbeddingIdentity | None, length: int) -> bool:
        built = self._embedding
        return (
            built is not None
            and (embedding is None or embedding == built)
            and length == built.dimensions
        )

    # --- service calls ----------------------------------------------------------

    def _client(self) -> SearchClient:
        if self._search is None:
            raise IndexUnavailable("the Azure AI Search index is not open")
        return self._search

    async def _query(self, **options: Any) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            results = await self._client().search(**options)
            return [dict(row) async for row in results]

        return await self._guard(run)

    async def _count(self, filter_: str, search_text: str | None = None) -> int:
        async def run() -> int:
            results = await self._client().search(
                search_text=search_text, filter=filter_, top=0, include_total_count=True
            )
            return int(await results.get_count())

        return await self._guard(run)

    async def _facets(self, filter_: str, facet: str) -> dict[str, list[dict[str, Any]]]:
        async def run() -> dict[str, list[dict[str, Any]]]:
            results = await self._client().search(filter=filter_, top=0, facets=[facet])
            return dict(await results.get_facets() or {})

        return await self._guard(run)

    async def _trimmed(self, terms: str, tenant_id: str, filter_: str) -> int:
        """Text matches in the caller's tenant minus those the caller may read: two
        count-only queries, the first privileged (tenant filter only); never chunks."""
        if not terms:
            return 0
        everyone, permitted = await asyncio.gather(
            self._count(_tenant_filter(tenant_id), terms), self._count(filter_, terms)
        )
        return max(0, everyone - permitted)

    async def _get(self, key: str) -> dict[str, Any] | None:
        async def run() -> dict[str, Any] | None:
            try:
                return dict(await self._client().get_document(key))
            except ResourceNotFoundError:
                return None

        return await self._guard(run)

    async def _all(self, filter_: str, select: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            page = await self._query(
                filter=filter_, select=select, order_by=["id"], top=_PAGE, skip=len(rows)
            )
            rows.extend(page)
            if len(page) < _PAGE:
                return rows

    async def _stored_chunks(self, document_id: str) -> list[_Stored]:
        rows = await self._all(
            f"kind eq 'chunk' and document_id eq {odata_literal(document_id)}", ["id", "tenant_id"]
        )
        return [_Stored(str(row["id"]), str(row["tenant_id"])) for row in rows]

    async def _generation(self, tenant_id: str) -> str:
        row = await self._get(_tenant_key(tenant_id))
        return str(row["generation"]) if row else "0"

    async def _bump(self, tenants: Iterable[str]) -> None:
        records = [
            {
                "id": _tenant_key(tenant),
                "kind": "tenant",
                "tenant_id": tenant,
                "generation": uuid.uuid4().hex,
            }
            for tenant in sorted(set(tenants))
        ]
        await self._index_documents("mergeOrUpload", records, "the tenant generation")

    async def _index_documents(
        self, action: str, documents: Sequence[dict[str, Any]], what: str
    ) -> None:
        """Send ``documents`` in batches; documents the service reports as transiently
        failed are sent again with backoff, and any left failing are reported by key."""
        add = {
            "mergeOrUpload": IndexDocumentsBatch.add_merge_or_upload_actions,
            "merge": IndexDocumentsBatch.add_merge_actions,
            "delete": IndexDocumentsBatch.add_delete_actions,
        }[action]
        for start in range(0, len(documents), self._batch_size):
            pending = list(documents[start : start + self._batch_size])
            for attempt in range(self._max_retries + 1):
                batch = IndexDocumentsBatch()
                add(batch, pending)
                results: list[IndexingResult] = await self._guard(
                    functools.partial(self._client().index_documents, batch)
                )
                failed = {r.key: r for r in results if not r.succeeded}
                transient = [
                    d
                    for d in pending
                    if (r := failed.get(d["id"])) and r.status_code in _RETRYABLE_DOCUMENT
                ]
                if len(transient) < len(failed) or not transient or attempt == self._max_retries:
                    if failed:
                        raise IndexUnavailable(_failures(what, failed.values(), len(pending)))
                    break
                pending = transient
                await self._sleep(self._backoff(attempt, None))

    async def _guard(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` with retries on throttling; every other failure of the
        service becomes :class:`IndexUnavailable` (fail closed)."""
        try:
            return await self._retrying(operation)
        except ResourceNotFoundError:
            raise
        except (AzureError, KeyError, TypeError, ValueError) as error:
            raise self._unavailable(error) from error

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await operation()
            except HttpResponseError as error:
                if error.status_code not in _RETRYABLE or attempt >= self._max_retries:
                    raise
                headers = getattr(error.response, "headers", None)
                await self._sleep(self._backoff(attempt, retry_after_seconds(headers)))
                attempt += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, never shorter than the service asked."""
        jittered = random.uniform(0, self._retry_backoff * 2**attempt)
        return max(jittered, retry_after) if retry_after is not None else jittered

    def _unavailable(self, error: Exception) -> IndexUnavailable:
        status = getattr(error, "status_code", None)
        detail = f" (HTTP {status})" if status else ""
        return IndexUnavailable(
            f"the Azure AI Search index {self._index_name!r} could not be reached{detail}"
        )

    def _chunk_document(self, chunk: Chunk, content_hash: str) -> dict[str, Any]:
        return {
            "id": document_key(chunk.chunk_id),
            "kind": "chunk",
            "chunk_id": chunk.chunk_id,
            "document_id": chunk.document_id,
            "content": chunk.text,
            "title": chunk.title,
            "source": chunk.source,
            "page": chunk.page,
            "section": chunk.section,
            "ordinal": chunk.ordinal,
            "content_hash": content_hash,
            **_access_fields(chunk.access),
        }


def _access_fields(access: AccessControl) -> dict[str, Any]:
    return {
        "tenant_id": access.tenant_id,
        "public": access.public,
        "user_ids": sorted(access.users),
        "group_ids": sorted(access.groups),
    }


def _access_of(row: Mapping[str, Any]) -> AccessControl:
    return AccessControl(
        tenant_id=str(row["tenant_id"]),
        public=bool(row.get("public")),
        users=frozenset(row.get("user_ids") or ()),
        groups=frozenset(row.get("group_ids") or ()),
    )


def _chunk_of(row: Mapping[str, Any]) -> Chunk:
    return Chunk(
        chunk_id=str(row["chunk_id"]),
        document_id=str(row["document_id"]),
        source=str(row["source"]),
        title=str(row["title"]),
        text=str(row["content"]),
        ordinal=int(row["ordinal"]),
        access=_access_of(row),
        page=row.get("page"),
        section=row.get("section"),
    )


def _mismatch(index: str, built: EmbeddingIdentity, asked: EmbeddingIdentity) -> str:
    return (
        f"the Azure AI Search index {index!r} was built by {built.model!r} "
        f"({built.dimensions} dimensions), not {asked.model!r} ({asked.dimensions}): "
        f"re-index, or configure {built.model!r}"
    )


def _failures(what: str, failed: Iterable[IndexingResult], total: int) -> str:
    failures = list(failed)
    listed = "; ".join(
        f"{_chunk_id_of(r.key)}: HTTP {r.status_code} {r.error_message or ''}".rstrip()
        for r in failures[:10]
    )
    return f"{len(failures)} of {total} index writes for {what} failed: {listed}"


def _chunk_id_of(key: str | None) -> str:
    if key and key.startswith("c"):
        try:
            return base64.urlsafe_b64decode(key[1:]).decode()
        except ValueError:
            pass
    return str(key)
