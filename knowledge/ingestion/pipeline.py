"""Ingest a folder of documents into a :class:`~knowledge.contracts.KnowledgeIndex`."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from knowledge.contracts import (
    AccessControl,
    Chunk,
    DocumentParseError,
    IngestionReport,
    IngestProgress,
    KnowledgeError,
    KnowledgeIndex,
    SkippedFile,
)
from knowledge.ingestion.acl import AccessRules
from knowledge.ingestion.chunking import chunk_sections
from knowledge.ingestion.parsers import is_supported, parse_document
from knowledge.settings import KnowledgeSettings


def document_id_for(tenant_id: str, source: str) -> str:
    """Stable id of the document at corpus-relative path ``source`` in ``tenant_id``."""
    # NUL cannot occur in a tenant id or a path, so distinct pairs never collide.
    return hashlib.sha256(f"{tenant_id}\0{source}".encode()).hexdigest()[:32]


def chunk_id_for(document_id: str, ordinal: int) -> str:
    return f"{document_id}-{ordinal:05d}"


@dataclass(frozen=True, slots=True)
class _Candidate:
    path: Path
    relative: str
    """The path under the corpus root, which access rules match."""
    source: str
    """The document's identity in the index: the relative path, after any source prefix."""
    size: int
    symlink: bool


def _walk(root: Path, excluded: Path | None, prefix: str) -> list[_Candidate]:
    """Every non-hidden file under ``root`` except ``excluded``, sorted by relative path."""
    found: list[_Candidate] = []
    for directory, subdirectories, files in os.walk(root):
        # Pruning in place stops os.walk descending into hidden folders (.git, .venv, ...).
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in files:
            path = Path(directory, name)
            if name.startswith(".") or (excluded is not None and path == excluded):
                continue
            symlink = path.is_symlink()
            size = 0 if symlink else path.stat().st_size
            relative = path.relative_to(root).as_posix()
            found.append(_Candidate(path, relative, prefix + relative, size, symlink))
    return sorted(found, key=lambda candidate: candidate.relative)


class IngestionPipeline:
    """Walks a corpus, parses, access-tags and chunks each file, and indexes it.

    Files are processed in sorted order, one at a time; parsing runs in a
    worker thread. A file that cannot be indexed is reported in
    :attr:`IngestionReport.skipped` and ingestion continues; its chunks from
    any earlier run are deleted, so a revoked or broken file stops being served.
    """

    def __init__(self, index: KnowledgeIndex, settings: KnowledgeSettings) -> None:
        self._index = index
        self._settings = settings

    async def ingest(
        self,
        root: Path,
        *,
        acl_file: Path | None = None,
        progress: IngestProgress | None = None,
        source_prefix: str = "",
    ) -> IngestionReport:
        root = await asyncio.to_thread(root.resolve)
        if not await asyncio.to_thread(root.is_dir):
            raise KnowledgeError(f"corpus folder not found: {root}")
        acl_path = await asyncio.to_thread(
            (acl_file or root / self._settings.acl_file_name).resolve
        )
        rules = await asyncio.to_thread(AccessRules.load, acl_path)
        candidates = await asyncio.to_thread(_walk, root, acl_path, source_prefix)

        indexed = 0
        chunk_total = 0
        skipped: list[SkippedFile] = []
        for done, candidate in enumerate(candidates, start=1):
            outcome = await self._load(candidate, rules.access_for(candidate.relative))
            if isinstance(outcome, str):
                skipped.append(SkippedFile(candidate.relative, outcome))
                await self._forget(rules.tenants, candidate.source)
            else:
                tenant_id = outcome[0].access.tenant_id
                await self._index.replace_document(outcome[0].document_id, outcome)
                # The same path indexed under another tenant by an earlier ACL is stale now.
                await self._forget(rules.tenants - {tenant_id}, candidate.source)
                indexed += 1
                chunk_total += len(outcome)
            if progress is not None:
                progress(candidate.relative, done, len(candidates))

        return IngestionReport(
            files_seen=len(candidates),
            files_indexed=indexed,
            chunks_indexed=chunk_total,
            skipped=tuple(skipped),
        )

    async def _load(self, candidate: _Candidate, access: AccessControl | None) -> list[Chunk] | str:
        """The chunks of ``candidate``, or why it is not indexed."""
        if access is None:
            return "no access rule matches"
        if candidate.symlink:
            return "symbolic links are not followed"
        if not is_supported(candidate.path):
            return f"unsupported file type '{candidate.path.suffix or candidate.path.name}'"
        if candidate.size > self._settings.max_file_mb * 1024 * 1024:
            return f"larger than {self._settings.max_file_mb:g} MB"
        try:
            return await asyncio.to_thread(self._prepare, candidate, access)
        except DocumentParseError as exc:
            return str(exc)

    def _prepare(self, candidate: _Candidate, access: AccessControl) -> list[Chunk]:
        """Parse and chunk one file. Blocking: runs in a worker thread."""
        parsed = parse_document(candidate.path)
        pieces = chunk_sections(
            parsed.sections,
            chunk_words=self._settings.chunk_tokens,
            overlap_words=self._settings.chunk_overlap,
        )
        if not pieces:
            raise DocumentParseError(f"{candidate.path.name}: no extractable text")
        document_id = document_id_for(access.tenant_id, candidate.source)
        return [
            Chunk(
                chunk_id=chunk_id_for(document_id, ordinal),
                document_id=document_id,
                source=candidate.source,
                title=parsed.title,
                text=piece.text,
                ordinal=ordinal,
                access=access,
                page=piece.page,
                section=piece.section,
            )
            for ordinal, piece in enumerate(pieces)
        ]

    async def _forget(self, tenants: frozenset[str], source: str) -> None:
        for tenant in sorted(tenants):
            await self._index.delete_document(document_id_for(tenant, source))
