"""Public contract of the knowledge layer.

Retrieval is security-trimmed *inside* the index query: a backend receives an
:class:`AccessFilter` (data, not code) and must apply it before ranking. No
function here may return a chunk the caller is not allowed to see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class KnowledgeCaller(Protocol):
    """The identity fields retrieval filters by."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    @property
    def groups(self) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class AccessControl:
    """Who may read a chunk: everyone in ``tenant_id`` when ``public``, else the
    listed users and members of the listed groups."""

    tenant_id: str
    public: bool = False
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AccessFilter:
    """The caller's side of the ACL check, handed to an index backend as data."""

    tenant_id: str
    user_id: str
    groups: frozenset[str]

    @classmethod
    def for_caller(cls, caller: KnowledgeCaller) -> AccessFilter:
        return cls(tenant_id=caller.tenant_id, user_id=caller.user_id, groups=caller.groups)

    def allows(self, access: AccessControl) -> bool:
        """Reference semantics of the filter; backends implement the same rule in their query."""
        if access.tenant_id != self.tenant_id:
            return False
        return access.public or self.user_id in access.users or bool(self.groups & access.groups)


@dataclass(frozen=True, slots=True)
class AccessScope:
    """What a caller may see, condensed into two opaque strings, for keying caches.

    ``fingerprint`` is the same for two callers exactly when they see the same chunks:
    it hashes the tenant and those of the caller's principals (user id, groups) that
    some ACL of the tenant names. Principals no ACL names change nothing a caller can
    see, so callers who differ only in those share a fingerprint. ``generation``
    changes whenever a document of the tenant is added, changed or deleted, in this
    process or another; together, the two say "the same view of the same corpus".
    """

    fingerprint: str
    generation: str

    @classmethod
    def of(
        cls, tenant_id: str, *, users: Iterable[str], groups: Iterable[str], generation: str
    ) -> AccessScope:
        """The scope of a caller whose ``users`` / ``groups`` are the principals named in
        some ACL of ``tenant_id`` (the caller's own, intersected with the named ones).
        Every backend builds its scope here, so fingerprints mean the same everywhere."""
        # JSON keeps the parts apart: no choice of names can make two callers collide.
        canonical = json.dumps([tenant_id, sorted(set(users)), sorted(set(groups))])
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:32]
        return cls(fingerprint=fingerprint, generation=generation)

    @classmethod
    def nothing(cls, tenant_id: str, generation: str) -> AccessScope:
        """The scope of a caller the index denies outright (no tenant, or neither a user
        id nor a group). Such a caller sees no chunk, whereas an identified caller whom no
        ACL names still sees the public ones: the two must never share a cached answer,
        so this fingerprint hashes a shape :meth:`of` never produces."""
        canonical = json.dumps([tenant_id, None])
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:32]
        return cls(fingerprint=fingerprint, generation=generation)


@dataclass(frozen=True, slots=True)
class Chunk:
    chunk_id: str
    document_id: str
    source: str
    """Path of the source document relative to the ingested root, with '/' separators."""
    title: str
    text: str
    ordinal: int
    access: AccessControl
    page: int | None = None
    section: str | None = None


@dataclass(frozen=True, slots=True)
class RetrievedPassage:
    chunk: Chunk
    score: float


class SearchMode(StrEnum):
    """How an index ranks: BM25 over the text, nearest vectors, or both fused with
    Reciprocal Rank Fusion. Every mode applies the caller's ACL inside the search."""

    TEXT = "text"
    VECTOR = "vector"
    HYBRID = "hybrid"


@dataclass(frozen=True, slots=True)
class EmbeddingIdentity:
    """Which embedding model built an index's vectors: a query embedded by another model
    (or with another dimension) is refused with :class:`EmbeddingMismatch`."""

    model: str
    dimensions: int


class Embedder(Protocol):
    """What the knowledge layer needs of an embedding model. The composition root adapts
    the inferencing layer's model (local, or Azure OpenAI ``text-embedding-3-*``)."""

    @property
    def identity(self) -> EmbeddingIdentity: ...

    async def embed(self, texts: Sequence[str], *, tenant_id: str) -> list[tuple[float, ...]]:
        """One unit-length vector per text, in order (``tenant_id`` meters the call)."""
        ...


@dataclass(frozen=True, slots=True)
class SearchRequest:
    text: str
    top_k: int
    mode: SearchMode = SearchMode.HYBRID
    vector: tuple[float, ...] | None = None
    """The query's embedding; required by ``VECTOR`` and ``HYBRID``."""
    embedding: EmbeddingIdentity | None = None
    """Which model made ``vector``: it must be the model that built the index."""


@dataclass(frozen=True, slots=True)
class SearchHits:
    passages: tuple[RetrievedPassage, ...]
    """The best ``top_k`` permitted passages, best first."""
    trimmed: int = 0
    """How many matches in the caller's tenant the ACL excluded (a separate, privileged
    count: the filtered search itself cannot see them). Counts only, never the chunks."""


@dataclass(frozen=True, slots=True)
class DocumentState:
    """What the index holds of one document: enough for ingestion to skip an unchanged
    file, update an ACL alone, and remove a deleted file (``lamina ingest --sync``)."""

    document_id: str
    source: str
    content_hash: str
    access: AccessControl
    chunks: int


@dataclass(frozen=True, slots=True)
class RetrievalQuery:
    text: str
    top_k: int = 5
    mode: SearchMode | None = None
    """``None``: the deployment's default mode (``LAMINA_KNOWLEDGE__SEARCH_MODE``)."""


@dataclass(frozen=True, slots=True)
class RetrievalResult:
    passages: tuple[RetrievedPassage, ...]
    index: str
    trimmed_count: int = 0
    """How many matches in the caller's tenant the ACL filter excluded: a count for audit,
    never the chunks."""


class Retriever(Protocol):
    """Security-trimmed retrieval: every call carries the caller's identity."""

    async def retrieve(self, query: RetrievalQuery, caller: KnowledgeCaller) -> RetrievalResult: ...

    async def get_chunk(self, chunk_id: str, caller: KnowledgeCaller) -> Chunk | None:
        """The chunk if it exists and the caller may see it, else ``None`` (never a hint which)."""
        ...

    async def access_scope(self, caller: KnowledgeCaller) -> AccessScope:
        """The caller's :class:`AccessScope`: equal for callers who see the same chunks of
        the same corpus, different as soon as their view or the tenant's corpus differs."""
        ...


def check_document_write(
    document_id: str,
    chunks: Sequence[Chunk],
    vectors: Sequence[Sequence[float]] | None,
    embedding: EmbeddingIdentity | None,
) -> None:
    """What every :meth:`KnowledgeIndex.replace_document` refuses before writing: chunks
    of another document, vectors without their model's identity, and vectors that are
    not one per chunk of the model's dimensions (``ValueError``, a caller's bug)."""
    strays = [chunk.chunk_id for chunk in chunks if chunk.document_id != document_id]
    if strays:
        raise ValueError(f"chunks {strays} do not belong to document {document_id!r}")
    if vectors is None:
        return
    if embedding is None:
        raise ValueError("vectors need the embedding identity of the model that made them")
    if len(vectors) != len(chunks):
        raise ValueError(f"{len(vectors)} vectors for {len(chunks)} chunks")
    if any(len(vector) != embedding.dimensions for vector in vectors):
        raise ValueError(f"every vector must have {embedding.dimensions} dimensions")


class KnowledgeIndex(Protocol):
    """An index backend. ``search`` applies ``access`` inside its query, before ranking.

    Every backend passes ``tests/knowledge/index_contract.py``."""

    @property
    def name(self) -> str: ...

    @property
    def embedding(self) -> EmbeddingIdentity | None:
        """The model that built the stored vectors, as of this process's last look;
        ``None`` while the index holds none (or none it has seen yet)."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def replace_document(
        self,
        document_id: str,
        chunks: Sequence[Chunk],
        *,
        content_hash: str,
        vectors: Sequence[Sequence[float]] | None = None,
        embedding: EmbeddingIdentity | None = None,
    ) -> None:
        """Atomically replace every chunk of ``document_id`` with ``chunks`` (and their
        ``vectors``, one per chunk, made by ``embedding``). Raises
        :class:`EmbeddingMismatch` when ``embedding`` is not the index's."""
        ...

    async def update_access(self, document_id: str, access: AccessControl) -> bool:
        """Change who may read a document's chunks, without touching text or vectors.
        Returns whether the document exists."""
        ...

    async def delete_document(self, document_id: str) -> None: ...

    async def documents(self, tenant_id: str, *, source_prefix: str = "") -> list[DocumentState]:
        """The tenant's documents whose source starts with ``source_prefix``."""
        ...

    async def search(self, request: SearchRequest, access: AccessFilter) -> SearchHits:
        """Raises :class:`EmbeddingMismatch` when the request's embedding is not the
        index's (as stored now, re-read if this process's view is stale), and
        ``ValueError`` when a vector mode comes without a vector. A hybrid search of an
        index that holds no vectors ranks by text alone."""
        ...

    async def get_chunk(self, chunk_id: str, access: AccessFilter) -> Chunk | None: ...

    async def access_scope(self, access: AccessFilter) -> AccessScope:
        """See :meth:`Retriever.access_scope`. ``generation`` must change with every
        ``replace_document`` / ``delete_document`` that changes a chunk of the tenant,
        including writes by another process; it may stay put when nothing changed."""
        ...

    async def count_chunks(self) -> int: ...


# --- ingestion ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class IngestionReport:
    files_seen: int
    files_indexed: int
    """Files (re-)chunked and (re-)embedded: new or changed content."""
    chunks_indexed: int
    skipped: tuple[SkippedFile, ...] = field(default=())
    """Corrupt, encrypted, empty, unsupported or too large: reported, never fatal. Also
    files whose parsing was deferred (:class:`DocumentParseDeferred`): still served as
    indexed before, retried by the next run."""
    files_unchanged: int = 0
    """Same content hash and same ACL as indexed: no work at all."""
    access_updated: int = 0
    """Same content, new ACL: permissions changed without re-embedding."""
    files_removed: int = 0
    """With ``sync``: documents in the index whose file is gone, deleted."""


IngestProgress = Callable[[str, int, int], None]
"""Called as ``progress(relative_path, files_done, files_total)`` after each file."""


class Ingestor(Protocol):
    async def ingest(
        self,
        root: Path,
        *,
        acl_file: Path | None = None,
        progress: IngestProgress | None = None,
        source_prefix: str = "",
        sync: bool = False,
    ) -> IngestionReport:
        """Index every file under ``root`` under the access rules of ``acl_file``.

        Each document's source (its identity in the index, shown in citations) is
        ``source_prefix`` followed by its path relative to ``root``; the ACL's globs match
        the relative path. A prefix gives a set of documents a namespace of its own (an
        upload can then never replace a document of the tenant's corpus).

        Idempotent: a file whose content hash and ACL match the index is skipped, one whose
        ACL alone changed gets :meth:`KnowledgeIndex.update_access` (no re-embedding).
        With ``sync``, documents under the prefix whose file is gone are deleted. An
        interrupted run leaves a usable index; running again finishes the work."""
        ...


# --- errors ------------------------------------------------------------------


class KnowledgeError(Exception):
    """Base of knowledge-layer failures; the message is safe to show a user."""


class AccessRulesError(KnowledgeError):
    """The ACL file is missing, malformed, or names no tenant."""


class DocumentParseError(KnowledgeError):
    """A document could not be parsed (corrupt, encrypted or unsupported). Ingestion
    skips the file and deletes what the index held of it: a broken file stops being
    served."""


class DocumentParseDeferred(DocumentParseError):
    """A document could not be parsed *now*, through no fault of its own (a parsing
    service that failed or ran out of time on it). Ingestion skips the file but keeps
    what the index holds of it, and records no new content hash, so the next run
    parses it again."""


class IndexUnavailable(KnowledgeError):
    """The index could not be queried. Retrieval fails closed: no results, an error."""


class EmbeddingMismatch(KnowledgeError):
    """A query or document embedded by another model than the one that built the index:
    searching would return garbage, so it is refused (re-index, or configure the model
    named in the message)."""
