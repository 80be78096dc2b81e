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


@dataclass(frozen=True, slots=True)
class RetrievalQuery:
    text: str
    top_k: int = 5


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


class KnowledgeIndex(Protocol):
    """An index backend. ``search`` applies ``access`` inside its query, before ranking."""

    @property
    def name(self) -> str: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def replace_document(self, document_id: str, chunks: Sequence[Chunk]) -> None:
        """Atomically replace every chunk of ``document_id`` with ``chunks``."""
        ...

    async def delete_document(self, document_id: str) -> None: ...

    async def search(
        self, text: str, access: AccessFilter, top_k: int
    ) -> tuple[list[RetrievedPassage], int]:
        """Best ``top_k`` permitted passages, and how many matches in the caller's tenant the
        filter excluded."""
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
    chunks_indexed: int
    skipped: tuple[SkippedFile, ...] = field(default=())


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
    ) -> IngestionReport:
        """Index every file under ``root`` under the access rules of ``acl_file``.

        Each document's source (its identity in the index, shown in citations) is
        ``source_prefix`` followed by its path relative to ``root``; the ACL's globs match
        the relative path. A prefix gives a set of documents a namespace of its own (an
        upload can then never replace a document of the tenant's corpus)."""
        ...


# --- errors ------------------------------------------------------------------


class KnowledgeError(Exception):
    """Base of knowledge-layer failures; the message is safe to show a user."""


class AccessRulesError(KnowledgeError):
    """The ACL file is missing, malformed, or names no tenant."""


class DocumentParseError(KnowledgeError):
    """A document could not be parsed (corrupt, encrypted or unsupported)."""


class IndexUnavailable(KnowledgeError):
    """The index could not be queried. Retrieval fails closed: no results, an error."""
