"""Embedded knowledge index: SQLite FTS5 (BM25) with the ACL applied inside the query.

Layout: ``chunks`` holds each chunk and its tenant / public flag,
``chunk_principals`` the users and groups granted read access, and
``chunks_fts`` is an external-content FTS5 table over ``chunks`` kept in step
by triggers. Every read joins the ACL predicate into the same statement that
ranks, so a forbidden chunk can never take a top-k slot or come back.

``corpus_generations`` counts, per tenant, the writes that changed one of its
chunks, and ``index_identity`` holds a random id of the database file; together
they make the ``generation`` of :meth:`SqliteKnowledgeIndex.access_scope`, which
caches key on, so a write by any process (``lamina ingest``) is seen by all.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from knowledge.contracts import (
    AccessControl,
    AccessFilter,
    AccessScope,
    Chunk,
    IndexUnavailable,
    RetrievedPassage,
)

_SCHEMA_VERSION = 2
# Version 2 only added tables and an index (IF NOT EXISTS), so opening upgrades a version 1 file.
_UPGRADABLE = (0, 1, _SCHEMA_VERSION)

_SCHEMA = """
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

-- One row per grant; 'u:' and 'g:' prefixes keep user and group names from colliding.
CREATE TABLE IF NOT EXISTS chunk_principals (
    chunk     INTEGER NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    principal TEXT NOT NULL,
    PRIMARY KEY (chunk, principal)
) WITHOUT ROWID;

-- Which principals a tenant's ACLs name (access_scope) without scanning every grant.
CREATE INDEX IF NOT EXISTS chunk_principals_by_principal ON chunk_principals (principal, chunk);

-- Bumped in the transaction of every write that changes a chunk of the tenant.
CREATE TABLE IF NOT EXISTS corpus_generations (
    tenant_id  TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
) WITHOUT ROWID;

-- Generations restart at zero in a new file: the file's random id keeps the old keys apart.
CREATE TABLE IF NOT EXISTS index_identity (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    instance TEXT NOT NULL
);
INSERT OR IGNORE INTO index_identity (id, instance) VALUES (1, lower(hex(randomblob(16))));

CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (
    text, title, section,
    content = 'chunks', content_rowid = 'id', tokenize = 'porter unicode61'
);

CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, title, section)
    VALUES (new.id, new.text, new.title, new.section);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, title, section)
    VALUES ('delete', old.id, old.text, old.title, old.section);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_update AFTER UPDATE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, title, section)
    VALUES ('delete', old.id, old.text, old.title, old.section);
    INSERT INTO chunks_fts (rowid, text, title, section)
    VALUES (new.id, new.text, new.title, new.section);
END;
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

# Body text counts most; title and heading matches help but repeat across a document's chunks.
_RANK = "bm25(chunks_fts, 1.0, 0.5, 0.5)"

_SEARCH = f"""
SELECT {_CHUNK_COLUMNS}, {_RANK} AS rank
FROM chunks_fts JOIN chunks AS c ON c.id = chunks_fts.rowid
WHERE chunks_fts MATCH :query AND {_PERMITTED}
ORDER BY rank
LIMIT :top_k
"""

# Counted within the caller's tenant only: other tenants' matches are none of its audit.
_COUNT_TRIMMED = f"""
SELECT count(*)
FROM chunks_fts JOIN chunks AS c ON c.id = chunks_fts.rowid
WHERE chunks_fts MATCH :query AND c.tenant_id = :tenant AND NOT ({_PERMITTED})
"""

_GET_CHUNK = (
    f"SELECT {_CHUNK_COLUMNS} FROM chunks AS c WHERE c.chunk_id = :chunk_id AND {_PERMITTED}"
)

_DOCUMENT_CHUNKS = f"SELECT {_CHUNK_COLUMNS} FROM chunks AS c WHERE c.document_id = ?"

_DOCUMENT_TENANTS = "SELECT DISTINCT tenant_id FROM chunks WHERE document_id = ?"

_BUMP_GENERATION = """
INSERT INTO corpus_generations (tenant_id, generation) VALUES (?, 1)
ON CONFLICT (tenant_id) DO UPDATE SET generation = generation + 1
"""

# One statement, so one snapshot: the file's identity, the tenant's generation, and the
# caller's principals that some chunk of the tenant grants (the rest change nothing the
# caller can see; the index on chunk_principals (principal, ...) makes each a seek).
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
    (chunk_id, document_id, source, title, text, ordinal, page, section, tenant_id, public)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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


def to_match_expression(text: str) -> str | None:
    """Turn free user text into a safe FTS5 MATCH expression, or ``None`` if it has no terms.

    Every term is a double-quoted FTS5 string, so operators (AND, NEAR, ``*``,
    ``^``, column filters) and stray quotes in user text are plain words, never
    syntax. Terms are OR-ed so that BM25 ranks partial matches too.
    """
    terms = list(dict.fromkeys(term.lower() for term in _TERM.findall(text)))
    # A query made only of stopwords ("who is it") still searches for them.
    meaningful = [term for term in terms if term not in _STOPWORDS] or terms
    if not meaningful:
        return None
    quoted = ('"' + term.replace('"', '""') + '"' for term in meaningful[:_MAX_QUERY_TERMS])
    return " OR ".join(quoted)


def _principals(access: AccessFilter) -> str:
    return json.dumps([f"u:{access.user_id}", *(f"g:{group}" for group in sorted(access.groups))])


def _grants(access: AccessControl) -> list[str]:
    return [f"u:{user}" for user in sorted(access.users)] + [
        f"g:{group}" for group in sorted(access.groups)
    ]


def _chunk_from_row(row: sqlite3.Row) -> Chunk:
    principals: list[str] = json.loads(row[10]) if row[10] else []
    return Chunk(
        chunk_id=row[0],
        document_id=row[1],
        source=row[2],
        title=row[3],
        text=row[4],
        ordinal=row[5],
        page=row[6],
        section=row[7],
        access=AccessControl(
            tenant_id=row[8],
            public=bool(row[9]),
            users=frozenset(p[2:] for p in principals if p.startswith("u:")),
            groups=frozenset(p[2:] for p in principals if p.startswith("g:")),
        ),
    )


def _same_chunks(stored: Sequence[Chunk], replacement: Sequence[Chunk]) -> bool:
    def by_id(chunks: Sequence[Chunk]) -> list[Chunk]:
        return sorted(chunks, key=lambda chunk: chunk.chunk_id)

    return len(stored) == len(replacement) and by_id(stored) == by_id(replacement)


class SqliteKnowledgeIndex:
    """The embedded :class:`~knowledge.contracts.KnowledgeIndex`: one SQLite file, FTS5 BM25.

    One connection serves the process; an asyncio lock keeps each operation's
    statements together so a reader never sees half a document replacement.
    Any SQLite failure surfaces as :class:`IndexUnavailable` (retrieval fails
    closed).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return "sqlite-fts5"

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
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA busy_timeout = 5000")
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            if version not in _UPGRADABLE:
                raise IndexUnavailable(
                    f"knowledge index schema version {version} is not supported; re-ingest"
                )
            await db.executescript(
                f"BEGIN; {_SCHEMA} PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;"
            )
        except sqlite3.Error as exc:
            await db.close()
            raise IndexUnavailable(f"cannot open the knowledge index {self._path.name}") from exc
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
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
                await db.execute(f"BEGIN {mode}")
                try:
                    yield db
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise IndexUnavailable("the knowledge index failed; try again later") from exc

    async def replace_document(self, document_id: str, chunks: Sequence[Chunk]) -> None:
        strays = [chunk.chunk_id for chunk in chunks if chunk.document_id != document_id]
        if strays:
            raise ValueError(f"chunks {strays} do not belong to document {document_id!r}")
        async with self._transaction("IMMEDIATE") as db:
            async with db.execute(_DOCUMENT_CHUNKS, (document_id,)) as cursor:
                stored = [_chunk_from_row(row) for row in await cursor.fetchall()]
            if _same_chunks(stored, chunks):
                # Re-ingesting an unchanged file must not move the generation: that would
                # empty every answer cache of the tenant on each ``lamina ingest`` run.
                return
            tenants = {chunk.access.tenant_id for chunk in (*stored, *chunks)}
            await db.executemany(_BUMP_GENERATION, [(tenant,) for tenant in sorted(tenants)])
            # Principals and FTS rows follow through ON DELETE CASCADE and the trigger.
            await db.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
            for chunk in chunks:
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
                    ),
                )
                row_id = cursor.lastrowid
                await db.executemany(
                    "INSERT INTO chunk_principals (chunk, principal) VALUES (?, ?)",
                    [(row_id, grant) for grant in _grants(chunk.access)],
                )

    async def delete_document(self, document_id: str) -> None:
        async with self._transaction("IMMEDIATE") as db:
            async with db.execute(_DOCUMENT_TENANTS, (document_id,)) as cursor:
                tenants = [str(row[0]) for row in await cursor.fetchall()]
            if not tenants:
                return
            await db.executemany(_BUMP_GENERATION, [(tenant,) for tenant in tenants])
            await db.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))

    async def search(
        self, text: str, access: AccessFilter, top_k: int
    ) -> tuple[list[RetrievedPassage], int]:
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        expression = to_match_expression(text)
        if expression is None:
            return [], 0
        parameters = {
            "query": expression,
            "tenant": access.tenant_id,
            "principals": _principals(access),
            "top_k": top_k,
        }
        # One read transaction: the page and the trimmed count describe the same snapshot.
        async with self._transaction("DEFERRED") as db:
            async with db.execute(_SEARCH, parameters) as cursor:
                rows = list(await cursor.fetchall())
            async with db.execute(_COUNT_TRIMMED, parameters) as cursor:
                counted = await cursor.fetchone()
        passages = [
            RetrievedPassage(chunk=_chunk_from_row(row), score=-float(row[11])) for row in rows
        ]
        return passages, int(counted[0]) if counted else 0

    async def get_chunk(self, chunk_id: str, access: AccessFilter) -> Chunk | None:
        parameters = {
            "chunk_id": chunk_id,
            "tenant": access.tenant_id,
            "principals": _principals(access),
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
        parameters = {"tenant": access.tenant_id, "principals": _principals(access)}
        # Asked before every cached turn: one statement, one hop to the database thread.
        rows = await self._read_one_statement(_ACCESS_SCOPE, parameters)
        row = rows[0] if rows else None
        if row is None or row[0] is None:
            raise IndexUnavailable("the knowledge index has no identity; re-open it")
        named: list[str] = json.loads(row[2]) if row[2] else []
        return AccessScope.of(
            access.tenant_id,
            users=(p[2:] for p in named if p.startswith("u:")),
            groups=(p[2:] for p in named if p.startswith("g:")),
            generation=f"{row[0]}:{int(row[1])}",
        )

    async def count_chunks(self) -> int:
        async with (
            self._transaction("DEFERRED") as db,
            db.execute("SELECT count(*) FROM chunks") as cursor,
        ):
            row = await cursor.fetchone()
        return int(row[0]) if row else 0
