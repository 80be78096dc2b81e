"""Look inside the SQLite files a ``lamina`` process left behind: is the file sound, and
what does the knowledge index hold. For crash tests, which read the files of a killed
process directly, as its successor will."""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path


def integrity_problems(path: Path) -> list[str]:
    """What ``PRAGMA integrity_check`` finds wrong with the database at ``path`` (none: [])."""
    with closing(sqlite3.connect(path)) as db:
        found = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
    return [] if found == ["ok"] else found


@dataclass(frozen=True)
class IndexedDocument:
    """One document of the knowledge index, as a clean ingest of the same file would make it."""

    content_hash: str
    chunks: int
    text_sha256: str
    """Of the document's chunk texts in order: equal only if every chunk is there, whole."""


def indexed_documents(path: Path, *, source_prefix: str = "") -> dict[str, IndexedDocument]:
    """The documents of the index at ``path`` whose source starts with ``source_prefix``,
    by source without that prefix (so uploads compare with a folder's ingest)."""
    with closing(sqlite3.connect(path)) as db:
        documents = db.execute(
            "SELECT document_id, source, content_hash FROM documents"
            " WHERE substr(source, 1, ?) = ?",
            (len(source_prefix), source_prefix),
        ).fetchall()
        found: dict[str, IndexedDocument] = {}
        for document_id, source, content_hash in documents:
            texts = [
                str(row[0])
                for row in db.execute(
                    "SELECT text FROM chunks WHERE document_id = ? ORDER BY ordinal", (document_id,)
                )
            ]
            digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
            found[source[len(source_prefix) :]] = IndexedDocument(content_hash, len(texts), digest)
    return found


def index_inconsistencies(path: Path) -> list[str]:
    """What breaks the knowledge index's own invariants: chunks without their document (or
    the reverse), a chunk twice, gaps in a document's chunk ordinals, chunks without their
    access grants, a full-text index out of step with the chunks."""
    problems: list[str] = []
    checks = {
        "chunks whose document is not listed": (
            "SELECT count(*) FROM chunks"
            " WHERE document_id NOT IN (SELECT document_id FROM documents)"
        ),
        "documents without chunks": (
            "SELECT count(*) FROM documents"
            " WHERE document_id NOT IN (SELECT document_id FROM chunks)"
        ),
        "chunks stored twice": (
            "SELECT count(*) FROM (SELECT 1 FROM chunks GROUP BY document_id, ordinal"
            " HAVING count(*) > 1)"
        ),
        "documents with gaps in their chunk ordinals": (
            "SELECT count(*) FROM (SELECT document_id FROM chunks GROUP BY document_id"
            " HAVING min(ordinal) != 0 OR max(ordinal) != count(*) - 1)"
        ),
        "private chunks without access grants": (
            "SELECT count(*) FROM chunks AS c WHERE c.public = 0"
            " AND NOT EXISTS (SELECT 1 FROM chunk_principals AS p WHERE p.chunk = c.id)"
        ),
    }
    with closing(sqlite3.connect(path)) as db:
        for problem, query in checks.items():
            (count,) = db.execute(query).fetchone()
            if count:
                problems.append(f"{count} {problem}")
        try:
            # FTS5's own check: every chunk's text and ACL tokens are indexed, nothing else.
            db.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('integrity-check')")
        except sqlite3.DatabaseError as exc:
            problems.append(f"full-text index: {exc}")
    return problems
