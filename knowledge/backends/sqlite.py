"""Embedded knowledge index: SQLite FTS5 (BM25) plus dense vectors, ACL applied inside.

Layout: ``chunks`` holds each chunk, its tenant / public flag, its vector (float32
BLOB) and ``acl``: one token per principal allowed to read it. ``chunk_principals``
holds the same grants readably (``user:…``, ``group:…``), for ``get_chunk`` and
``access_scope``; ``documents`` holds each document's source, content hash and
access, for ``documents()`` (idempotent ingestion). ``chunks_fts`` is an
external-content FTS5 table over ``chunks`` (text, title, section, acl) kept in
step by triggers.

Text search puts the caller's ACL into the MATCH itself
(``{text title section}: (…) AND acl: (…)``), so FTS5 ranks only permitted chunks.
In memory (``sqlite_memory.IndexRows``), per write generation: every chunk's ACL tokens
as token → rows postings, its FTS5 document length and its vector. The caller's
permitted rows come from those postings first; text search then ranks them with
FTS5's bm25() formula over each query term's postings (read from FTS5's own index,
cached per generation), and vector search multiplies only their vectors (exact).
FTS5's MATCH with the ACL inside (``{text title section}: (…) AND acl: (…)``) remains
the text search for a query term FTS5 reads as several tokens. Hybrid fuses the two
permitted lists (``knowledge.backends.fusion``: standardised scores by default, or
Reciprocal Rank Fusion). A forbidden chunk can therefore never take
a top-k slot or come back. A write by this process updates the arrays at the next
search; a write by another process (``write_generation`` moved further) reloads them.

``corpus_generations`` counts, per tenant, the writes that changed one of its
chunks, and ``index_identity`` holds a random id of the database file; together
they make the ``generation`` of :meth:`SqliteKnowledgeIndex.access_scope`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import numpy as np
import numpy.typing as npt

from knowledge.backends.fusion import HybridFusion, fuse
from knowledge.backends.sqlite_memory import (
    IndexRows,
    RowData,
    TermPostings,
    document_lengths,
    postings_from_vocabulary,
)
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

_SCHEMA_VERSION = 3
# Versions 0-2 are upgraded in place on open (see _UPGRADE_TO_3).
_UPGRADABLE = (0, 1, 2, _SCHEMA_VERSION)


_TABLES = """
CREATE TABLE IF NOT EXISTS chunks (
    id          INTEGER PRIMARY KEY,
    chunk_id    TEXT NOT NULL UNIQUE,
    document_id TEXT NOT NULL,
    source      TEXT NOT NULL,
    title       TEXT NOT NULL,
    text        TEXT NOT NULL,
    ordinal     INTEGER NOT NULL,
    page        INTEGER,
    section     TEXT,
    tenant_id   TEXT NOT NULL,
    public      INTEGER NOT NULL CHECK (public IN (0, 1))
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (document_id);

-- One row per grant; 'user:' and 'group:' prefixes keep user and group names apart.
CREATE TABLE IF NOT EXISTS chunk_principals (
    chunk     INTEGER NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    principal TEXT NOT NULL,
    PRIMARY KEY (chunk, principal)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunk_principals_by_principal ON chunk_principals (principal, chunk);

CREATE TABLE IF NOT EXISTS corpus_generations (
    tenant_id  TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS index_identity (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    instance TEXT NOT NULL
);
INSERT OR IGNORE INTO index_identity (id, instance) VALUES (1, lower(hex(randomblob(16))));
"""

# Version 3: vectors, ACL tokens, the document table, index metadata, FTS over acl.
_VERSION_3 = """
ALTER TABLE chunks ADD COLUMN vector BLOB;
ALTER TABLE chunks ADD COLUMN acl TEXT NOT NULL DEFAULT '';

CREATE TABLE documents (
    document_id  TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    tenant_id    TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    public       INTEGER NOT NULL CHECK (public IN (0, 1)),
    users        TEXT NOT NULL,
    groups       TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX documents_by_tenant ON documents (tenant_id, source);

-- embedding_model / embedding_dimensions: set by the first vector write.
-- write_generation: moves with every write; the in-memory vector matrix follows it.
CREATE TABLE index_metadata (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO index_metadata (key, value) VALUES ('write_generation', '0');
"""

# The FTS index over text and ACL tokens, created after the tokens are filled in (its
# triggers must not see rows the new FTS table never indexed), then rebuilt from ``chunks``.
_VERSION_3_FTS = """
DROP TRIGGER IF EXISTS chunks_fts_insert;
DROP TRIGGER IF EXISTS chunks_fts_delete;
DROP TRIGGER IF EXISTS chunks_fts_update;
DROP TABLE IF EXISTS chunks_fts;
CREATE VIRTUAL TABLE chunks_fts USING fts5 (
    text, title, section, acl,
    content = 'chunks', content_rowid = 'id', tokenize = 'porter unicode61'
);
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, title, section, acl)
    VALUES (new.id, new.text, new.title, new.section, new.acl);
END;
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, title, section, acl)
    VALUES ('delete', old.id, old.text, old.title, old.section, old.acl);
END;
CREATE TRIGGER chunks_fts_update AFTER UPDATE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, title, section, acl)
    VALUES ('delete', old.id, old.text, old.title, old.section, old.acl);
    INSERT INTO chunks_fts (rowid, text, title, section, acl)
    VALUES (new.id, new.text, new.title, new.section, new.acl);
END;
INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild');
"""

# The reference rule of AccessFilter.allows, as SQL over the row aliased ``c``.
_PERMITTED = """
    c.tenant_id = :tenant
    AND (
        c.public = 1
        OR EXISTS (
            SELECT 1 FROM chunk_principals AS p
            WHERE p.chunk = c.id AND p.principal IN (SELECT value FROM json_each(:principals))
        )
    )
"""

_CHUNK_COLUMNS = """
    c.chunk_id, c.document_id, c.source, c.title, c.text, c.ordinal, c.page, c.section,
    c.tenant_id, c.public,
    (SELECT json_group_array(p.principal) FROM chunk_principals AS p WHERE p.chunk = c.id)
"""

# Body text counts most; title and heading matches help; the ACL tokens never rank.
# _TERM_POSTINGS gives the in-memory ranking the same weights (in halves).
_RANK = "bm25(chunks_fts, 1.0, 0.5, 0.5, 0.0)"

# Per connection: FTS5's tokenizer for query terms (a contentless table and its
# vocabulary) and the instance vocabulary of chunks_fts (term → rows, columns).
_TEMP_TABLES = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.lamina_query_terms USING fts5"
    " (term, content = '', tokenize = 'porter unicode61')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.lamina_query_vocabulary"
    " USING fts5vocab (temp, lamina_query_terms, instance)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.lamina_chunk_vocabulary"
    " USING fts5vocab (main, chunks_fts, instance)",
)

_TERM_POSTINGS = """
SELECT group_concat(doc, ' '), group_concat(CASE col WHEN 'text' THEN '2' ELSE '1' END, '')
FROM (SELECT doc, col FROM temp.lamina_chunk_vocabulary WHERE term = ? AND col != 'acl')
"""

# What IndexRows keeps of each chunk; %_docsize holds FTS5's column sizes of a row.
_ROW_DATA = """
SELECT c.id, c.acl, d.sz, c.vector
FROM chunks AS c LEFT JOIN chunks_fts_docsize AS d ON d.id = c.id
"""

# The MATCH carries the caller's ACL tokens: FTS5 ranks permitted chunks only.
_TEXT_SEARCH = f"""
SELECT rowid, {_RANK} AS rank
FROM chunks_fts
WHERE chunks_fts MATCH :query
ORDER BY rank
LIMIT :depth
"""

_COUNT_MATCHES = "SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH :query"

_CHUNKS_BY_ROW = f"""
SELECT {_CHUNK_COLUMNS}, c.id
FROM chunks AS c
WHERE c.id IN (SELECT value FROM json_each(:rows)) AND {_PERMITTED}
"""

_GET_CHUNK = (
    f"SELECT {_CHUNK_COLUMNS} FROM chunks AS c WHERE c.chunk_id = :chunk_id AND {_PERMITTED}"
)

_DOCUMENT_CHUNKS = (
    f"SELECT {_CHUNK_COLUMNS}, c.vector, c.id FROM chunks AS c WHERE c.document_id = ?"
)

_DOCUMENT_TENANTS = "SELECT DISTINCT tenant_id FROM chunks WHERE document_id = ?"

_BUMP_GENERATION = """
INSERT INTO corpus_generations (tenant_id, generation) VALUES (?, 1)
ON CONFLICT (tenant_id) DO UPDATE SET generation = generation + 1
"""

_BUMP_WRITE_GENERATION = """
UPDATE index_metadata SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)
WHERE key = 'write_generation'
"""

_METADATA = "SELECT key, value FROM index_metadata"

_ACCESS_SCOPE = """
SELECT
    (SELECT instance FROM index_identity WHERE id = 1),
    coalesce((SELECT generation FROM corpus_generations WHERE tenant_id = :tenant), 0),
    (
        SELECT json_group_array(wanted.value) FROM json_each(:principals) AS wanted
        WHERE EXISTS (
            SELECT 1 FROM chunk_principals AS p JOIN chunks AS c ON c.id = p.chunk
            WHERE p.principal = wanted.value AND c.tenant_id = :tenant
        )
    )
"""

_INSERT_CHUNK = """
INSERT INTO chunks
    (chunk_id, document_id, source, title, text, ordinal, page, section, tenant_id, public,
     acl, vector)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_UPSERT_DOCUMENT = """
INSERT INTO documents (document_id, source, tenant_id, content_hash, public, users, groups)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (document_id) DO UPDATE SET
    source = excluded.source, tenant_id = excluded.tenant_id,
    content_hash = excluded.content_hash, public = excluded.public,
    users = excluded.users, groups = excluded.groups
"""

_DOCUMENTS = """
SELECT d.document_id, d.source, d.content_hash, d.tenant_id, d.public, d.users, d.groups,
       (SELECT count(*) FROM chunks WHERE chunks.document_id = d.document_id)
FROM documents AS d
WHERE d.tenant_id = :tenant AND substr(d.source, 1, length(:prefix)) = :prefix
ORDER BY d.source
"""

_STOPWORDS = frozenset({
    "a", "about", "an", "and", "are", "as", "at", "be", "by", "can", "could", "did", "do", "does",
    "for", "from", "has", "have", "how", "i", "if", "in", "is", "it", "its", "me", "my", "not",
    "of", "on", "or", "our", "should", "so", "than", "that", "the", "their", "there", "these",
    "this", "to", "was", "we", "were", "what", "when", "where", "which", "who", "why", "will",
    "with", "would", "you", "your",
})  # fmt: skip
_MAX_QUERY_TERMS = 64
_TERM = re.compile(r"\w+")
# Bounds of the per-process caches: query term → FTS5 tokens, and token → postings
# (entries, and rows); longer terms and tokens are never cached.
_TOKENIZED_TERMS = 10_000
_CACHED_TERM_CHARS = 64
_CACHED_POSTINGS = 2_000_000  # row ids and frequencies: some 32 MB
# Writes by this process held for the next search; past this, it reloads instead.
_PENDING_ROWS = 50_000


def query_terms(text: str) -> list[str]:
    """The words of ``text`` a search looks for: lower-cased, once each, without
    stopwords (unless that leaves none), at most ``_MAX_QUERY_TERMS``."""
    terms = list(dict.fromkeys(term.lower() for term in _TERM.findall(text)))
    # A query made only of stopwords ("who is it") still searches for them.
    meaningful = [term for term in terms if term not in _STOPWORDS] or terms
    return meaningful[:_MAX_QUERY_TERMS]


def to_match_expression(text: str) -> str | None:
    """Turn free user text into a safe FTS5 MATCH expression, or ``None`` if it has no terms.

    Every term is a double-quoted FTS5 string, so operators (AND, NEAR, ``*``,
    ``^``, column filters) and stray quotes in user text are plain words, never
    syntax. Terms are OR-ed so that BM25 ranks partial matches too.
    """
    terms = query_terms(text)
    if not terms:
        return None
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def principal_token(tenant_id: str, principal: str) -> str:
    """The FTS token of ``principal`` (``public``, ``user:…``, ``group:…``, ``tenant``)
    within ``tenant_id``. A hash, in decimal digits: the tokenizer can neither split it
    (e-mail addresses, spaces) nor stem it, and the tenant is part of it, so a user or
    group of the same name in another tenant has another token."""
    digest = hashlib.blake2b(json.dumps([tenant_id, principal]).encode(), digest_size=16)
    return f"{int.from_bytes(digest.digest(), 'big'):039d}"


def _grants(access: AccessControl) -> list[str]:
    return [f"user:{user}" for user in sorted(access.users)] + [
        f"group:{group}" for group in sorted(access.groups)
    ]


def _acl_tokens(access: AccessControl) -> str:
    """What the ``acl`` column holds: the tenant's token (for the privileged count), and
    one token per principal that may read the chunk."""
    principals = ["tenant", *(["public"] if access.public else []), *_grants(access)]
    return " ".join(principal_token(access.tenant_id, p) for p in principals)


def _identified(access: AccessFilter) -> bool:
    """A caller with no tenant, or with neither a user id nor a group, sees nothing."""
    return bool(access.tenant_id) and bool(access.user_id or access.groups)


def _caller_principals(access: AccessFilter) -> list[str]:
    user = [f"user:{access.user_id}"] if access.user_id else []
    return [*user, *(f"group:{group}" for group in sorted(access.groups))]


def _caller_tokens(access: AccessFilter) -> list[str]:
    return [principal_token(access.tenant_id, p) for p in ["public", *_caller_principals(access)]]


def _acl_match(tokens: Sequence[str]) -> str:
    return "acl : (" + " OR ".join(f'"{token}"' for token in tokens) + ")"


def _split_principals(principals: Sequence[str]) -> tuple[frozenset[str], frozenset[str]]:
    users = frozenset(p.removeprefix("user:") for p in principals if p.startswith("user:"))
    groups = frozenset(p.removeprefix("group:") for p in principals if p.startswith("group:"))
    return users, groups


def _chunk_from_row(row: sqlite3.Row) -> Chunk:
    users, groups = _split_principals(json.loads(row[10]) if row[10] else [])
    return Chunk(
        chunk_id=row[0],
        document_id=row[1],
        source=row[2],
        title=row[3],
        text=row[4],
        ordinal=row[5],
        page=row[6],
        section=row[7],
        access=AccessControl(tenant_id=row[8], public=bool(row[9]), users=users, groups=groups),
    )


def _by_id(
    chunks: Sequence[Chunk], blobs: Sequence[bytes | None]
) -> list[tuple[Chunk, bytes | None]]:
    return sorted(zip(chunks, blobs, strict=True), key=lambda pair: pair[0].chunk_id)


Rows = npt.NDArray[np.int64]
_Fetched = Sequence[sqlite3.Row | tuple[object, ...]]


def _row_data(fetched: _Fetched) -> list[RowData]:
    """``RowData`` of rows read with ``_ROW_DATA``."""
    sizes = [_bytes(row[2]) for row in fetched]
    lengths = document_lengths(sizes)
    return [
        RowData(int(str(row[0])), str(row[1]), int(length), _bytes(row[3]) or None)
        for row, length in zip(fetched, lengths.tolist(), strict=True)
    ]


def _bytes(value: object) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError("the index holds a non-binary vector or document size")
    return bytes(value)


@dataclass(slots=True)
class _Pending:
    """Writes by this process since ``IndexRows`` was built, merged: the rows they removed
    from it and the rows they left (by ``chunks.id``)."""

    generation: int
    removed: set[int]
    added: dict[int, RowData]

    def add(self, before: int, removed: Sequence[int], added: Sequence[RowData]) -> bool:
        """Take in the write that moved the generation from ``before``; False if another
        write came between (the arrays must then be reloaded)."""
        if before != self.generation:
            return False
        for row_id in removed:
            if self.added.pop(row_id, None) is None:
                self.removed.add(row_id)
        for row in added:
            self.added[row.row_id] = row
        self.generation = before + 1
        return True


def _vector_blob(vector: Sequence[float], dimensions: int) -> bytes:
    array = np.asarray(vector, dtype="<f4")
    if array.shape != (dimensions,):
        raise ValueError(f"a vector has {array.size} dimensions; the embedding has {dimensions}")
    return array.tobytes()


def _mismatch(stored: EmbeddingIdentity, given: EmbeddingIdentity) -> EmbeddingMismatch:
    return EmbeddingMismatch(
        f"the knowledge index was built with embedding model {stored.model} "
        f"({stored.dimensions} dimensions), not {given.model} ({given.dimensions} dimensions): "
        f"configure {stored.model}, or re-index with {given.model}"
    )


class SqliteKnowledgeIndex:
    """The embedded :class:`~knowledge.contracts.KnowledgeIndex`: one SQLite file.

    One connection serves the process; an asyncio lock keeps each operation's
    statements together so a reader never sees half a document replacement. Every
    write is one transaction (WAL): an interrupted ingest leaves the previous state of
    the document it was writing. Any SQLite failure surfaces as
    :class:`IndexUnavailable` (retrieval fails closed).
    """

    def __init__(self, path: Path, *, fusion: HybridFusion | None = None) -> None:
        self._path = path
        self._fusion = fusion or HybridFusion()
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._embedding: EmbeddingIdentity | None = None
        # Held under the lock: the arrays of one generation, this process's writes since,
        # and the caches of query terms' FTS5 tokens and of tokens' postings.
        self._rows: IndexRows | None = None
        self._pending: _Pending | None = None
        self._tokenized: dict[str, tuple[str, ...]] = {}
        self._postings: dict[str, TermPostings] = {}
        self._postings_size = 0

    @property
    def name(self) -> str:
        return "sqlite-hybrid"

    @property
    def embedding(self) -> EmbeddingIdentity | None:
        """As of this process's last read or write of the index."""
        return self._embedding

    async def open(self) -> None:
        if self._db is not None:
            return
        try:
            await asyncio.to_thread(self._path.parent.mkdir, parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly below.
            db = await aiosqlite.connect(self._path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise IndexUnavailable(f"cannot open the knowledge index {self._path.name}") from exc
        try:
            await db.execute("PRAGMA busy_timeout = 5000")
            await _use_wal(db)
            await db.execute("PRAGMA foreign_keys = ON")
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            if version not in _UPGRADABLE:
                raise IndexUnavailable(
                    f"knowledge index schema version {version} is not supported; re-ingest"
                )
            if version < _SCHEMA_VERSION:
                await _upgrade(db)
            self._embedding = _embedding_of(await _metadata(db))
            for statement in _TEMP_TABLES:
                await db.execute(statement)
        except sqlite3.Error as exc:
            await db.close()
            raise IndexUnavailable(f"cannot open the knowledge index {self._path.name}") from exc
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        self._forget_rows()
        if db is not None:
            await db.close()

    @asynccontextmanager
    async def _transaction(self, mode: str) -> AsyncIterator[aiosqlite.Connection]:
        """Run a block as one transaction under the lock; map SQLite errors to IndexUnavailable."""
        async with self._lock:
            db = self._db
            if db is None:
                raise IndexUnavailable("the knowledge index is not open")
            try:
                try:
                    # BEGIN inside the try: a caller cancelled while it awaits BEGIN (an
                    # ingest job stopped) leaves it running on the connection's thread;
                    # the rollback, queued behind it, closes it (a no-op when none began).
                    # Else the connection stays in a transaction and every later write
                    # fails with "cannot start a transaction within a transaction".
                    await db.execute(f"BEGIN {mode}")
                    yield db
                    # COMMIT inside the try as well: SQLite may refuse it and keep the
                    # transaction open (a deferred constraint, SQLITE_BUSY outside WAL).
                    await db.execute("COMMIT")
                except BaseException:
                    await db.rollback()
                    raise
            except sqlite3.Error as exc:
                raise IndexUnavailable("the knowledge index failed; try again later") from exc

    # --- writes ----------------------------------------------------------------

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
        blobs: list[bytes | None] = [None] * len(chunks)
        if vectors is not None and embedding is not None:
            blobs = [_vector_blob(vector, embedding.dimensions) for vector in vectors]
        change: tuple[int, list[int], list[RowData]] | None = None
        async with self._transaction("IMMEDIATE") as db:
            metadata = await _metadata(db)
            stored_embedding = _embedding_of(metadata)
            if vectors is not None and embedding is not None:
                if stored_embedding is None:
                    await db.executemany(
                        "INSERT INTO index_metadata (key, value) VALUES (?, ?)",
                        [
                            ("embedding_model", embedding.model),
                            ("embedding_dimensions", str(embedding.dimensions)),
                        ],
                    )
                    stored_embedding = embedding
                elif stored_embedding != embedding:
                    raise _mismatch(stored_embedding, embedding)
            async with db.execute(_DOCUMENT_CHUNKS, (document_id,)) as cursor:
                rows = list(await cursor.fetchall())
            stored = [_chunk_from_row(row) for row in rows]
            if _by_id(stored, [row[11] for row in rows]) == _by_id(chunks, blobs):
                # Re-ingesting an unchanged file must not move the generation: that would
                # empty every answer cache of the tenant on each ``lamina ingest`` run.
                if chunks:
                    await _upsert_document(db, document_id, chunks[0], content_hash)
                return
            tenants = {chunk.access.tenant_id for chunk in (*stored, *chunks)}
            await db.executemany(_BUMP_GENERATION, [(tenant,) for tenant in sorted(tenants)])
            await db.execute(_BUMP_WRITE_GENERATION)
            # Principals and FTS rows follow through ON DELETE CASCADE and the trigger.
            await db.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
            for chunk, blob in zip(chunks, blobs, strict=True):
                cursor = await db.execute(
                    _INSERT_CHUNK,
                    (
                        chunk.chunk_id,
                        chunk.document_id,
                        chunk.source,
                        chunk.title,
                        chunk.text,
                        chunk.ordinal,
                        chunk.page,
                        chunk.section,
                        chunk.access.tenant_id,
                        int(chunk.access.public),
                        _acl_tokens(chunk.access),
                        blob,
                    ),
                )
                await db.executemany(
                    "INSERT INTO chunk_principals (chunk, principal) VALUES (?, ?)",
                    [(cursor.lastrowid, grant) for grant in _grants(chunk.access)],
                )
            if chunks:
                await _upsert_document(db, document_id, chunks[0], content_hash)
            else:
                await db.execute("DELETE FROM documents WHERE document_id = ?", (document_id,))
            self._embedding = await _forget_embedding_if_unused(db, stored_embedding)
            if self._rows is not None:
                change = (
                    int(metadata["write_generation"]),
                    [int(row[12]) for row in rows],
                    await _document_rows(db, document_id),
                )
        if change is not None:
            self._remember(*change)

    async def update_access(self, document_id: str, access: AccessControl) -> bool:
        change: tuple[int, list[int], list[RowData]] | None = None
        async with self._transaction("IMMEDIATE") as db:
            async with db.execute(
                "SELECT tenant_id, public, users, groups FROM documents WHERE document_id = ?",
                (document_id,),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return False
            current = AccessControl(
                tenant_id=row[0],
                public=bool(row[1]),
                users=frozenset(json.loads(row[2])),
                groups=frozenset(json.loads(row[3])),
            )
            if current == access:
                return True
            tenants = sorted({current.tenant_id, access.tenant_id})
            await db.executemany(_BUMP_GENERATION, [(tenant,) for tenant in tenants])
            before = await _write_generation(db)
            await db.execute(_BUMP_WRITE_GENERATION)
            # Text and vectors stay; the FTS trigger re-indexes the row with its new acl.
            await db.execute(
                "UPDATE chunks SET tenant_id = ?, public = ?, acl = ? WHERE document_id = ?",
                (access.tenant_id, int(access.public), _acl_tokens(access), document_id),
            )
            await db.execute(
                "DELETE FROM chunk_principals WHERE chunk IN"
                " (SELECT id FROM chunks WHERE document_id = ?)",
                (document_id,),
            )
            await db.executemany(
                "INSERT INTO chunk_principals (chunk, principal)"
                " SELECT id, ? FROM chunks WHERE document_id = ?",
                [(grant, document_id) for grant in _grants(access)],
            )
            await db.execute(
                "UPDATE documents SET tenant_id = ?, public = ?, users = ?, groups = ?"
                " WHERE document_id = ?",
                (
                    access.tenant_id,
                    int(access.public),
                    json.dumps(sorted(access.users)),
                    json.dumps(sorted(access.groups)),
                    document_id,
                ),
            )
            if self._rows is not None:
                added = await _document_rows(db, document_id)
                change = (before, [row.row_id for row in added], added)
        if change is not None:
            self._remember(*change)
        return True

    async def delete_document(self, document_id: str) -> None:
        change: tuple[int, list[int], list[RowData]] | None = None
        async with self._transaction("IMMEDIATE") as db:
            await db.execute("DELETE FROM documents WHERE document_id = ?", (document_id,))
            async with db.execute(_DOCUMENT_TENANTS, (document_id,)) as cursor:
                tenants = [str(row[0]) for row in await cursor.fetchall()]
            if not tenants:
                return
            await db.executemany(_BUMP_GENERATION, [(tenant,) for tenant in tenants])
            before = await _write_generation(db)
            await db.execute(_BUMP_WRITE_GENERATION)
            if self._rows is not None:
                removed = await db.execute_fetchall(
                    "SELECT id FROM chunks WHERE document_id = ?", (document_id,)
                )
                change = (before, [int(row[0]) for row in removed], [])
            await db.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
            self._embedding = await _forget_embedding_if_unused(db, await _read_embedding(db))
        if change is not None:
            self._remember(*change)

    # --- reads -----------------------------------------------------------------

    async def documents(self, tenant_id: str, *, source_prefix: str = "") -> list[DocumentState]:
        rows = await self._read_one_statement(
            _DOCUMENTS, {"tenant": tenant_id, "prefix": source_prefix}
        )
        return [
            DocumentState(
                document_id=row[0],
                source=row[1],
                content_hash=row[2],
                access=AccessControl(
                    tenant_id=row[3],
                    public=bool(row[4]),
                    users=frozenset(json.loads(row[5])),
                    groups=frozenset(json.loads(row[6])),
                ),
                chunks=int(row[7]),
            )
            for row in rows
        ]

    async def search(self, request: SearchRequest, access: AccessFilter) -> SearchHits:
        if request.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if request.mode is not SearchMode.TEXT and request.vector is None:
            raise ValueError(f"a {request.mode.value} search needs the query's vector")
        if not _identified(access):
            return SearchHits(passages=())
        terms = query_terms(request.text) if request.mode is not SearchMode.VECTOR else []
        tokens = _caller_tokens(access)
        tenant_token = principal_token(access.tenant_id, "tenant")
        hybrid = request.mode is SearchMode.HYBRID
        depth = max(request.top_k * 4, 50) if hybrid else request.top_k
        # One read transaction: lists, chunks and the trimmed count share one snapshot.
        async with self._transaction("DEFERRED") as db:
            metadata = await _metadata(db)
            stored = _embedding_of(metadata)
            self._embedding = stored
            query: npt.NDArray[np.float32] | None = None
            if request.mode is not SearchMode.TEXT:
                if stored is not None:
                    query = np.asarray(_checked_vector(request, stored), dtype=np.float32)
                elif not hybrid:
                    raise IndexUnavailable(
                        "the knowledge index holds no vectors: ingest documents with an "
                        "embedding model, or search in text mode"
                    )
            rows = await self._current_rows(db, int(metadata["write_generation"]), stored)
            phrases = await self._phrases(db, rows, terms) if terms else []
            ranking = await asyncio.to_thread(
                _rank,
                rows,
                phrases,
                query,
                tokens,
                tenant_token,
                depth,
                request.mode is SearchMode.VECTOR,
            )
            if phrases is None:
                # A term FTS5 reads as several tokens (a phrase): FTS5 ranks the text.
                ranking.text, ranking.trimmed = await _fts_text_search(
                    db, request.text, tokens, tenant_token, depth
                )
            if request.mode is SearchMode.TEXT:
                ranked = ranking.text
            elif request.mode is SearchMode.VECTOR:
                ranked = ranking.vector
            else:
                ranked = fuse(
                    ranking.text,
                    ranking.vector,
                    self._fusion,
                    text_complete=len(ranking.text) < depth,
                )
            ranked = ranked[: request.top_k]
            chunks = await _chunks_by_row(db, [row for row, _ in ranked], access)
        passages = tuple(
            RetrievedPassage(chunk=chunks[row], score=score)
            for row, score in ranked
            if row in chunks
        )
        return SearchHits(passages=passages, trimmed=ranking.trimmed)

    def _forget_rows(self) -> None:
        self._rows = None
        self._pending = None
        self._postings.clear()
        self._postings_size = 0

    def _remember(self, before: int, removed: Sequence[int], added: Sequence[RowData]) -> None:
        """Note a committed write of this process (which moved the generation from
        ``before``), for the next search to apply to the arrays instead of reloading."""
        if self._rows is None:
            return
        if self._pending is None:
            self._pending = _Pending(self._rows.generation, set(), {})
        if (
            not self._pending.add(before, removed, added)
            or len(self._pending.added) + len(self._pending.removed) > _PENDING_ROWS
        ):
            self._forget_rows()

    async def _current_rows(
        self, db: aiosqlite.Connection, generation: int, embedding: EmbeddingIdentity | None
    ) -> IndexRows:
        """The arrays of the snapshot ``db`` reads: this process's own writes applied to
        them, or reloaded when another process wrote since."""
        dimensions = embedding.dimensions if embedding is not None else 0
        rows, pending = self._rows, self._pending
        if rows is not None and (rows.generation != generation or rows.dimensions != dimensions):
            self._postings.clear()
            self._postings_size = 0
            if (
                pending is not None
                and pending.generation == generation
                and rows.dimensions == dimensions
            ):
                try:
                    removed = np.fromiter(pending.removed, dtype=np.int64)
                    added = sorted(pending.added.values(), key=lambda row: row.row_id)
                    rows = await asyncio.to_thread(rows.changed, generation, removed, added)
                except ValueError:
                    rows = None
            else:
                rows = None
            self._pending = None
        if rows is None:
            fetched = await db.execute_fetchall(_ROW_DATA + " ORDER BY c.id")
            try:
                rows = await asyncio.to_thread(_load_rows, generation, dimensions, list(fetched))
            except ValueError as exc:
                raise IndexUnavailable("the knowledge index is inconsistent; re-ingest") from exc
        self._rows = rows
        return rows

    async def _phrases(
        self, db: aiosqlite.Connection, rows: IndexRows, terms: Sequence[str]
    ) -> list[TermPostings] | None:
        """The postings of each query term, in order; ``None`` when FTS5 reads a term as
        other than one token (then it is a phrase, which only FTS5 can match)."""
        known = {term: self._tokenized[term] for term in terms if term in self._tokenized}
        unknown = [term for term in terms if term not in known]
        fresh = await _tokenize(db, unknown) if unknown else {}
        # Only short terms are kept: the cache's bound is a count of terms, so a query of
        # long made-up words must not be able to fill it with megabytes.
        kept = {term: tokens for term, tokens in fresh.items() if len(term) <= _CACHED_TERM_CHARS}
        if len(self._tokenized) + len(kept) > _TOKENIZED_TERMS:
            # Clearing drops this query's cached terms too: ``known`` holds them.
            self._tokenized.clear()
        self._tokenized.update(kept)
        tokenized = [known[term] if term in known else fresh[term] for term in terms]
        if any(len(tokens) != 1 for tokens in tokenized):
            return None
        phrases: list[TermPostings] = []
        for (token,) in tokenized:
            postings = self._postings.get(token)
            if postings is None:
                async with db.execute(_TERM_POSTINGS, (token,)) as cursor:
                    found = await cursor.fetchone()
                try:
                    postings = postings_from_vocabulary(
                        rows, found[0] if found else None, found[1] if found else None
                    )
                except ValueError as exc:
                    raise IndexUnavailable("the knowledge index is inconsistent") from exc
                # Bounded by rows and by entries: a word found nowhere has no rows, so a
                # stream of made-up words would otherwise grow it without limit.
                if len(token) <= _CACHED_TERM_CHARS:
                    if (
                        self._postings_size + postings.rows.size > _CACHED_POSTINGS
                        or len(self._postings) >= _TOKENIZED_TERMS
                    ):
                        self._postings.clear()
                        self._postings_size = 0
                    self._postings[token] = postings
                    self._postings_size += int(postings.rows.size)
            phrases.append(postings)
        return phrases

    async def get_chunk(self, chunk_id: str, access: AccessFilter) -> Chunk | None:
        if not _identified(access):
            return None
        parameters = {
            "chunk_id": chunk_id,
            "tenant": access.tenant_id,
            "principals": json.dumps(_caller_principals(access)),
        }
        # A cache hit re-reads every source chunk: one statement, one hop, no BEGIN/COMMIT.
        rows = await self._read_one_statement(_GET_CHUNK, parameters)
        return _chunk_from_row(rows[0]) if rows else None

    async def _read_one_statement(
        self, sql: str, parameters: Mapping[str, object]
    ) -> list[sqlite3.Row]:
        """Rows of one SELECT, under the lock. A single statement reads one snapshot in
        autocommit mode, so it needs no explicit transaction (and its two extra hops)."""
        async with self._lock:
            db = self._db
            if db is None:
                raise IndexUnavailable("the knowledge index is not open")
            try:
                return list(await db.execute_fetchall(sql, parameters))
            except sqlite3.Error as exc:
                raise IndexUnavailable("the knowledge index failed; try again later") from exc

    async def access_scope(self, access: AccessFilter) -> AccessScope:
        parameters = {
            "tenant": access.tenant_id,
            "principals": json.dumps(_caller_principals(access)),
        }
        # Asked before every cached turn: one statement, one hop to the database thread.
        rows = await self._read_one_statement(_ACCESS_SCOPE, parameters)
        row = rows[0] if rows else None
        if row is None or row[0] is None:
            raise IndexUnavailable("the knowledge index has no identity; re-open it")
        generation = f"{row[0]}:{int(row[1])}"
        if not _identified(access):
            return AccessScope.nothing(access.tenant_id, generation)
        users, groups = _split_principals(json.loads(row[2]) if row[2] else [])
        return AccessScope.of(access.tenant_id, users=users, groups=groups, generation=generation)

    async def count_chunks(self) -> int:
        rows = await self._read_one_statement("SELECT count(*) FROM chunks", {})
        return int(rows[0][0]) if rows else 0


async def _count(db: aiosqlite.Connection, query: str) -> int:
    rows = list(await db.execute_fetchall(_COUNT_MATCHES, {"query": query}))
    return int(rows[0][0]) if rows else 0


@dataclass(slots=True)
class _Ranking:
    text: list[tuple[int, float]]
    vector: list[tuple[int, float]]
    trimmed: int


def _rank(
    rows: IndexRows,
    phrases: Sequence[TermPostings] | None,
    query: npt.NDArray[np.float32] | None,
    tokens: Sequence[str],
    tenant_token: str,
    depth: int,
    count_vectors: bool,
) -> _Ranking:
    """Both permitted lists, best first, and the trimmed count (of text matches when the
    search has words, else of the tenant's vectors)."""
    permitted = rows.mask(tokens)
    tenant = rows.mask([tenant_token])
    text: list[tuple[int, float]] = []
    trimmed = 0
    if phrases:
        text, trimmed = rows.bm25(phrases, permitted, tenant, depth)
    vector: list[tuple[int, float]] = []
    if query is not None:
        readable = permitted & rows.has_vector
        vector = rows.nearest(query, np.flatnonzero(readable), depth)
        if count_vectors:
            # Every chunk is a candidate of a nearest-neighbour search: the tenant's
            # vectors the ACL excluded.
            in_tenant = int(np.count_nonzero(tenant & rows.has_vector))
            trimmed = in_tenant - int(np.count_nonzero(readable))
    return _Ranking(text, vector, trimmed)


async def _fts_text_search(
    db: aiosqlite.Connection, text: str, tokens: Sequence[str], tenant_token: str, depth: int
) -> tuple[list[tuple[int, float]], int]:
    """FTS5's own ranking of the permitted matches, and the trimmed count of two MATCH
    counts: for queries with a term FTS5 reads as a phrase of several tokens."""
    expression = to_match_expression(text)
    if expression is None:
        return [], 0
    columns = "{text title section} : (" + expression + ")"
    parameters = {"query": f"{columns} AND {_acl_match(tokens)}", "depth": depth}
    async with db.execute(_TEXT_SEARCH, parameters) as cursor:
        ranked = [(int(row[0]), -float(row[1])) for row in await cursor.fetchall()]
    trimmed = await _count(db, f"{columns} AND {_acl_match([tenant_token])}") - await _count(
        db, f"{columns} AND {_acl_match(tokens)}"
    )
    return ranked, trimmed


async def _tokenize(db: aiosqlite.Connection, terms: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each term's tokens as FTS5's tokenizer (that of ``chunks_fts``) makes them."""
    await db.execute(
        "INSERT INTO temp.lamina_query_terms (lamina_query_terms) VALUES ('delete-all')"
    )
    await db.executemany(
        "INSERT INTO temp.lamina_query_terms (rowid, term) VALUES (?, ?)",
        list(enumerate(terms, start=1)),
    )
    found = await db.execute_fetchall(
        "SELECT doc, term FROM temp.lamina_query_vocabulary ORDER BY doc, offset"
    )
    await db.execute(
        "INSERT INTO temp.lamina_query_terms (lamina_query_terms) VALUES ('delete-all')"
    )
    by_term: dict[int, list[str]] = {}
    for row in found:
        by_term.setdefault(int(row[0]), []).append(str(row[1]))
    return {term: tuple(by_term.get(n, ())) for n, term in enumerate(terms, start=1)}


def _load_rows(generation: int, dimensions: int, fetched: _Fetched) -> IndexRows:
    return IndexRows.build(generation, dimensions, _row_data(fetched))


async def _document_rows(db: aiosqlite.Connection, document_id: str) -> list[RowData]:
    fetched = await db.execute_fetchall(
        _ROW_DATA + " WHERE c.document_id = ? ORDER BY c.id", (document_id,)
    )
    return _row_data(list(fetched))


async def _write_generation(db: aiosqlite.Connection) -> int:
    return int((await _metadata(db))["write_generation"])


def _checked_vector(request: SearchRequest, stored: EmbeddingIdentity) -> tuple[float, ...]:
    """The request's vector, after checking that the index's model made it."""
    given = request.embedding
    if given is None:
        raise ValueError("a vector search needs the embedding identity of its vector")
    if given != stored or len(request.vector or ()) != stored.dimensions:
        raise _mismatch(stored, given)
    return request.vector or ()


async def _chunks_by_row(
    db: aiosqlite.Connection, rows: Sequence[int], access: AccessFilter
) -> dict[int, Chunk]:
    """The chunks of ``rows`` that ``access`` permits (checked again, in SQL)."""
    if not rows:
        return {}
    parameters = {
        "rows": json.dumps(list(rows)),
        "tenant": access.tenant_id,
        "principals": json.dumps(_caller_principals(access)),
    }
    found = await db.execute_fetchall(_CHUNKS_BY_ROW, parameters)
    return {int(row[11]): _chunk_from_row(row) for row in found}


async def _upsert_document(
    db: aiosqlite.Connection, document_id: str, first: Chunk, content_hash: str
) -> None:
    await db.execute(
        _UPSERT_DOCUMENT,
        (
            document_id,
            first.source,
            first.access.tenant_id,
            content_hash,
            int(first.access.public),
            json.dumps(sorted(first.access.users)),
            json.dumps(sorted(first.access.groups)),
        ),
    )


def _embedding_of(metadata: Mapping[str, str]) -> EmbeddingIdentity | None:
    model = metadata.get("embedding_model")
    dimensions = metadata.get("embedding_dimensions")
    if model is None or dimensions is None:
        return None
    return EmbeddingIdentity(model=model, dimensions=int(dimensions))


async def _metadata(db: aiosqlite.Connection) -> dict[str, str]:
    return {str(row[0]): str(row[1]) for row in await db.execute_fetchall(_METADATA)}


async def _read_embedding(db: aiosqlite.Connection) -> EmbeddingIdentity | None:
    return _embedding_of(await _metadata(db))


async def _forget_embedding_if_unused(
    db: aiosqlite.Connection, embedding: EmbeddingIdentity | None
) -> EmbeddingIdentity | None:
    """Once no vector is left, the index belongs to no model: re-indexing with another
    model can start from an emptied index without deleting the file."""
    if embedding is None:
        return None
    rows = list(await db.execute_fetchall("SELECT 1 FROM chunks WHERE vector IS NOT NULL LIMIT 1"))
    if rows:
        return embedding
    await db.execute(
        "DELETE FROM index_metadata WHERE key IN ('embedding_model', 'embedding_dimensions')"
    )
    return None


async def _upgrade(db: aiosqlite.Connection) -> None:
    """Bring the file to the current version under the write lock. Another process may
    have upgraded it between our first read of ``user_version`` and the lock, so the
    version is read again inside the transaction. Statements run one by one:
    ``executescript`` would commit the transaction that holds the lock."""
    await db.create_function("lamina_acl_tokens", 3, _migrated_acl_tokens)
    await db.execute("BEGIN IMMEDIATE")
    try:
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        if (int(row[0]) if row else 0) < _SCHEMA_VERSION:
            for statement in _statements(_UPGRADE_TO_3):
                await db.execute(statement)
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")


def _statements(script: str) -> list[str]:
    """The statements of ``script``, whole (a trigger's body stays with its trigger)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:80]!r}")
    return statements


def _migrated_acl_tokens(tenant_id: str, public: int, principals: str) -> str:
    """``_acl_tokens`` of a chunk stored by an older version (SQL function of the upgrade)."""
    users, groups = _split_principals(json.loads(principals))
    return _acl_tokens(AccessControl(tenant_id, bool(public), users, groups))


# Brings a version 0-2 file to version 3 in _upgrade's transaction: the new columns and
# tables, grants renamed to 'user:' / 'group:', every chunk's ACL tokens, the FTS index
# rebuilt with its acl column, and each document recorded with an empty content hash (the
# next ingest re-indexes it once and stores its hash).
_UPGRADE_TO_3 = f"""
{_TABLES}
{_VERSION_3}
UPDATE chunk_principals SET principal = 'user:' || substr(principal, 3) WHERE principal LIKE 'u:%';
UPDATE chunk_principals SET principal = 'group:' || substr(principal, 3) WHERE principal LIKE 'g:%';
UPDATE chunks SET acl = lamina_acl_tokens(
    tenant_id, public,
    (SELECT json_group_array(p.principal) FROM chunk_principals AS p WHERE p.chunk = chunks.id)
);
{_VERSION_3_FTS}
INSERT INTO documents (document_id, source, tenant_id, content_hash, public, users, groups)
SELECT
    c.document_id, c.source, c.tenant_id, '', c.public,
    (SELECT json_group_array(substr(p.principal, 6)) FROM chunk_principals AS p
     WHERE p.chunk = c.id AND p.principal LIKE 'user:%'),
    (SELECT json_group_array(substr(p.principal, 7)) FROM chunk_principals AS p
     WHERE p.chunk = c.id AND p.principal LIKE 'group:%')
FROM chunks AS c
WHERE c.id = (SELECT min(id) FROM chunks AS first WHERE first.document_id = c.document_id);
PRAGMA user_version = {_SCHEMA_VERSION};
"""


async def _use_wal(db: aiosqlite.Connection, *, attempts: int = 50) -> None:
    """Switch a file to write-ahead logging. Leaving rollback journaling needs the file
    to itself, and SQLite answers "database is locked" at once, without waiting, while
    another process opens or upgrades it (a server and `lamina ingest` starting
    together): try again for a few seconds."""
    for attempt in range(attempts):
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1)
