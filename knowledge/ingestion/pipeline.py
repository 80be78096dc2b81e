"""Ingest a folder of documents into a :class:`~knowledge.contracts.KnowledgeIndex`.

Ingestion is incremental. Every indexed document carries a content hash: the sha256
of its file's bytes, combined with everything else that decides its chunks and
vectors (the parser/chunker version, the chunk size and overlap, the embedding
model). A run asks the index what it holds (:meth:`KnowledgeIndex.documents`) and
then, per file:

- same hash, same ACL: nothing to do (the file is hashed, never parsed or embedded);
- same hash, new ACL: :meth:`KnowledgeIndex.update_access` only, no re-embedding;
- new or changed: parse, chunk, embed, :meth:`KnowledgeIndex.replace_document`;
- new or changed, but its parse deferred (:class:`DocumentParseDeferred`): kept as
  indexed, under its current ACL, and its old hash with it, so the next run retries.

Each document is committed on its own, so an interrupted run leaves a usable index,
and running again redoes only what was not committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from knowledge.contracts import (
    AccessControl,
    Chunk,
    DocumentParseDeferred,
    DocumentParseError,
    DocumentState,
    Embedder,
    EmbeddingIdentity,
    EmbeddingMismatch,
    IngestionReport,
    IngestProgress,
    KnowledgeError,
    KnowledgeIndex,
    SkippedFile,
)
from knowledge.ingestion.acl import AccessRules
from knowledge.ingestion.chunking import chunk_sections
from knowledge.ingestion.parsers import DocumentParser, is_supported, parse_document
from knowledge.settings import KnowledgeSettings

PIPELINE_VERSION = "2"
"""Part of every content hash: bump it when parsing or chunking changes what a file
yields, and the next run re-indexes every file instead of skipping it as unchanged."""

EMBED_BATCH_SIZE = 64
"""Chunks per embedding call, gathered across small documents: large enough to keep a
model busy, small enough that memory stays flat however large the corpus."""


def document_id_for(tenant_id: str, source: str) -> str:
    """Stable id of the document at corpus-relative path ``source`` in ``tenant_id``."""
    # NUL cannot occur in a tenant id or a path, so distinct pairs never collide.
    return hashlib.sha256(f"{tenant_id}\0{source}".encode()).hexdigest()[:32]


def chunk_id_for(document_id: str, ordinal: int) -> str:
    return f"{document_id}-{ordinal:05d}"


def embedding_text(chunk: Chunk) -> str:
    """What is embedded for ``chunk``: its text under its title and heading, so that a
    passage that never names its subject ("It renews yearly") still lands near it."""
    context = " — ".join(part for part in (chunk.title, chunk.section) if part)
    return f"{context}\n\n{chunk.text}" if context else chunk.text


@dataclass(frozen=True, slots=True)
class _Candidate:
    path: Path
    relative: str
    """The path under the corpus root, which access rules match."""
    source: str
    """The document's identity in the index: the relative path, after any source prefix."""
    size: int
    symlink: bool


@dataclass(slots=True)
class _Waiting:
    """A new or changed document, chunked, and filling up with its vectors."""

    relative: str
    tenant_id: str
    chunks: list[Chunk]
    content_hash: str
    vectors: list[tuple[float, ...]] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return len(self.vectors) == len(self.chunks)


@dataclass(slots=True)
class _Tally:
    indexed: int = 0
    chunks: int = 0
    unchanged: int = 0
    access_updated: int = 0
    removed: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)


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


def _file_sha256(path: Path) -> str:
    """Blocking; reads in blocks, so a large file never sits in memory whole."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _content_hash(
    file_sha256: str,
    settings: KnowledgeSettings,
    model: EmbeddingIdentity | None,
    parser: str | None = None,
) -> str:
    """The hash stored with a document: its bytes plus everything else that shapes its
    chunks and vectors, so changing any of them re-indexes the file. ``parser`` names a
    parser standing in for the built-in one (the built-in ones add nothing, so their
    hashes stay as they were)."""
    parts = [
        PIPELINE_VERSION,
        str(settings.chunk_tokens),
        str(settings.chunk_overlap),
        f"{model.model}/{model.dimensions}" if model is not None else "text-only",
        file_sha256,
    ]
    if parser is not None:
        parts.append(parser)
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _unindexable_reason(
    candidate: _Candidate, access: AccessControl | None, settings: KnowledgeSettings
) -> str | None:
    """Why ``candidate`` is not indexed, if that shows without opening it."""
    if access is None:
        return "no access rule matches"
    if candidate.symlink:
        return "symbolic links are not followed"
    if not is_supported(candidate.path):
        return f"unsupported file type '{candidate.path.suffix or candidate.path.name}'"
    if candidate.size > settings.max_file_mb * 1024 * 1024:
        return f"larger than {settings.max_file_mb:g} MB"
    return None


def _prepare(
    candidate: _Candidate,
    access: AccessControl,
    settings: KnowledgeSettings,
    pdf_parser: DocumentParser | None = None,
) -> list[Chunk]:
    """Parse and chunk one file. Blocking: runs in a worker thread."""
    parsed = parse_document(candidate.path, pdf=pdf_parser)
    pieces = chunk_sections(
        parsed.sections, chunk_words=settings.chunk_tokens, overlap_words=settings.chunk_overlap
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


class IngestionPipeline:
    """Walks a corpus, parses, access-tags and chunks each new or changed file, embeds
    its chunks and indexes it; an unchanged file costs a hash, an ACL-only change an
    update.

    Files are processed in sorted order; hashing and parsing run in a worker thread.
    Chunks are embedded in batches of ``embed_batch_size``, gathered across documents;
    a document is written once all its vectors are in, so memory is bounded by one
    batch plus the largest document, never by the corpus. A file that cannot be
    indexed is reported in :attr:`IngestionReport.skipped` and ingestion continues;
    its chunks from any earlier run are deleted, so a revoked or broken file stops
    being served. A file whose parse is deferred (:class:`DocumentParseDeferred`: the
    parser's fault, not the file's) is reported too, but keeps its chunks. With no
    ``embedder`` the index gets text only (BM25 search).

    PDFs are parsed by ``pdf_parser`` when given (the composition root builds the one
    ``LAMINA_KNOWLEDGE__PDF_PARSER`` names), else locally; other files always locally.
    A parser failure that is not a :class:`DocumentParseError` (a parsing service that
    cannot be used) stops the run instead of skipping every file.
    """

    def __init__(
        self,
        index: KnowledgeIndex,
        settings: KnowledgeSettings,
        *,
        embedder: Embedder | None = None,
        embed_batch_size: int = EMBED_BATCH_SIZE,
        pdf_parser: DocumentParser | None = None,
    ) -> None:
        if embed_batch_size < 1:
            raise ValueError("embed_batch_size must be positive")
        self._index = index
        self._settings = settings
        self._embedder = embedder
        self._batch_size = embed_batch_size
        self._pdf_parser = pdf_parser

    async def ingest(
        self,
        root: Path,
        *,
        acl_file: Path | None = None,
        progress: IngestProgress | None = None,
        source_prefix: str = "",
        sync: bool = False,
    ) -> IngestionReport:
        root = await asyncio.to_thread(root.resolve)
        if not await asyncio.to_thread(root.is_dir):
            raise KnowledgeError(f"corpus folder not found: {root}")
        self._check_embedding_model()
        acl_path = await asyncio.to_thread(
            (acl_file or root / self._settings.acl_file_name).resolve
        )
        rules = await asyncio.to_thread(AccessRules.load, acl_path)
        candidates = await asyncio.to_thread(_walk, root, acl_path, source_prefix)
        # What the index holds under this prefix, in every tenant the rules name: one
        # small record per document (not per chunk), the basis of every skip.
        indexed: dict[str, DocumentState] = {}
        for tenant in sorted(rules.tenants):
            for state in await self._index.documents(tenant, source_prefix=source_prefix):
                indexed[state.document_id] = state

        run = _Run(
            self._index,
            self._settings,
            self._embedder,
            self._batch_size,
            pdf_parser=self._pdf_parser,
            tenants=rules.tenants,
            indexed=indexed,
            total=len(candidates),
            progress=progress,
        )
        for candidate in candidates:
            await run.handle(candidate, rules.access_for(candidate.relative))
        await run.flush()
        if sync:
            await run.remove_missing({c.source for c in candidates}, source_prefix)

        tally = run.tally
        return IngestionReport(
            files_seen=len(candidates),
            files_indexed=tally.indexed,
            chunks_indexed=tally.chunks,
            skipped=tuple(tally.skipped),
            files_unchanged=tally.unchanged,
            access_updated=tally.access_updated,
            files_removed=tally.removed,
        )

    def _check_embedding_model(self) -> None:
        """Refuse up front, not after parsing half the corpus, to mix two models' vectors."""
        built_by = self._index.embedding
        if self._embedder is None or built_by is None or built_by == self._embedder.identity:
            return
        configured = self._embedder.identity
        raise EmbeddingMismatch(
            f"the index was built with embedding model {built_by.model!r} "
            f"({built_by.dimensions} dimensions), but {configured.model!r} "
            f"({configured.dimensions} dimensions) is configured: configure "
            f"{built_by.model!r}, or ingest into a new index to change model"
        )


class _Run:
    """One ingestion run: what the index held, what waits for vectors, what the report
    will say, and which files progress has announced."""

    def __init__(
        self,
        index: KnowledgeIndex,
        settings: KnowledgeSettings,
        embedder: Embedder | None,
        batch_size: int,
        *,
        pdf_parser: DocumentParser | None,
        tenants: frozenset[str],
        indexed: dict[str, DocumentState],
        total: int,
        progress: IngestProgress | None,
    ) -> None:
        self._index = index
        self._settings = settings
        self._embedder = embedder
        self._batch_size = batch_size
        self._pdf_parser = pdf_parser
        self._tenants = tenants
        self._indexed = indexed
        self._total = total
        self._progress = progress
        self._announced = 0
        self._queue: deque[_Waiting] = deque()
        """Chunked documents waiting for their vectors, in file order, all of one tenant."""
        self._unembedded = 0
        self._unannounced: deque[str] = deque()
        self.tally = _Tally()

    async def handle(self, candidate: _Candidate, access: AccessControl | None) -> None:
        reason = _unindexable_reason(candidate, access, self._settings)
        if access is None or reason is not None:
            await self._skip(candidate, reason or "no access rule matches")
            return
        try:
            file_hash = await asyncio.to_thread(_file_sha256, candidate.path)
        except OSError as exc:
            await self._skip(candidate, f"cannot read file ({exc.strerror})")
            return
        model = self._embedder.identity if self._embedder is not None else None
        pdf = self._pdf_parser if candidate.path.suffix.lower() == ".pdf" else None
        content_hash = _content_hash(
            file_hash, self._settings, model, pdf.name if pdf is not None else None
        )
        document_id = document_id_for(access.tenant_id, candidate.source)
        # The same path indexed under another tenant by an earlier ACL is stale now.
        await self._forget(candidate.source, keep=access.tenant_id)
        state = self._indexed.get(document_id)
        if state is not None and state.content_hash == content_hash:
            if state.access == access:
                self.tally.unchanged += 1
            else:
                await self._index.update_access(document_id, access)
                self.tally.access_updated += 1
            self._announce(candidate.relative)
            return
        try:
            chunks = await asyncio.to_thread(_prepare, candidate, access, self._settings, pdf)
        except DocumentParseDeferred as exc:
            await self._defer(candidate, document_id, access, str(exc))
            return
        except DocumentParseError as exc:
            await self._skip(candidate, str(exc))
            return
        if self._queue and self._queue[0].tenant_id != access.tenant_id:
            await self.flush()  # an embedding call is metered to one tenant
        self._queue.append(_Waiting(candidate.relative, access.tenant_id, chunks, content_hash))
        if self._embedder is not None:
            self._unembedded += len(chunks)
        self._unannounced.append(candidate.relative)
        await self._embed_and_write(final=False)

    async def flush(self) -> None:
        """Embed the last, partial batch and write every waiting document."""
        await self._embed_and_write(final=True)

    async def _embed_and_write(self, *, final: bool) -> None:
        """Embed full batches (and, when ``final``, the partial rest), then write each
        waiting document whose vectors are all in, in order, and announce it."""
        embedder = self._embedder
        if embedder is not None:
            while self._unembedded >= self._batch_size or (final and self._unembedded):
                await self._embed_batch(embedder)
        while self._queue and (embedder is None or self._queue[0].embedded):
            waiting = self._queue.popleft()
            await self._index.replace_document(
                waiting.chunks[0].document_id,
                waiting.chunks,
                content_hash=waiting.content_hash,
                vectors=waiting.vectors if embedder is not None else None,
                embedding=embedder.identity if embedder is not None else None,
            )
            self.tally.indexed += 1
            self.tally.chunks += len(waiting.chunks)
            self._announce_written()

    async def _embed_batch(self, embedder: Embedder) -> None:
        """Embed the next ``batch_size`` chunks waiting for vectors, across documents."""
        targets: list[_Waiting] = []
        texts: list[str] = []
        for waiting in self._queue:
            room = self._batch_size - len(texts)
            missing = waiting.chunks[len(waiting.vectors) :][:room]
            targets.extend([waiting] * len(missing))
            texts.extend(embedding_text(chunk) for chunk in missing)
            if len(texts) == self._batch_size:
                break
        vectors = await embedder.embed(texts, tenant_id=self._queue[0].tenant_id)
        if len(vectors) != len(texts):
            raise KnowledgeError(
                f"the embedding model returned {len(vectors)} vectors for {len(texts)} passages"
            )
        for waiting, vector in zip(targets, vectors, strict=True):
            waiting.vectors.append(vector)
        self._unembedded -= len(texts)

    async def remove_missing(self, present: set[str], prefix: str) -> None:
        """Delete the documents under ``prefix`` whose file is no longer in the folder.

        Only sources this folder could have produced count: a relative path never holds
        ``//``, so other namespaces under the same prefix (``upload://<user>/...`` when
        the prefix is empty) are never touched."""
        for state in list(self._indexed.values()):
            if state.source in present or "//" in state.source[len(prefix) :]:
                continue
            await self._index.delete_document(state.document_id)
            self.tally.removed += 1

    async def _skip(self, candidate: _Candidate, reason: str) -> None:
        self.tally.skipped.append(SkippedFile(candidate.relative, reason))
        await self._forget(candidate.source, keep=None)
        self._announce(candidate.relative)

    async def _defer(
        self, candidate: _Candidate, document_id: str, access: AccessControl, reason: str
    ) -> None:
        """Skip a file whose parse was deferred, keeping what the index holds of it. Its
        old content hash stays too, so the next run parses it again; only its ACL is
        brought up to date, so a revoked reader loses it now, as with any other file."""
        state = self._indexed.get(document_id)
        if state is None:
            reason += "; the next run retries it"
        else:
            if state.access != access:
                await self._index.update_access(document_id, access)
            reason += "; the indexed version is kept and the next run retries it"
        self.tally.skipped.append(SkippedFile(candidate.relative, reason))
        self._announce(candidate.relative)

    async def _forget(self, source: str, *, keep: str | None) -> None:
        """Delete ``source``'s document in every tenant of the rules except ``keep``."""
        for tenant in sorted(self._tenants - {keep} if keep is not None else self._tenants):
            document_id = document_id_for(tenant, source)
            if self._indexed.pop(document_id, None) is not None:
                await self._index.delete_document(document_id)

    def _announce(self, relative: str) -> None:
        """Report progress in file order, each file once it is durably handled: a file
        waiting for vectors holds back the files after it until it is written."""
        self._unannounced.append(relative)
        self._announce_written()

    def _announce_written(self) -> None:
        waiting = {entry.relative for entry in self._queue}
        while self._unannounced and self._unannounced[0] not in waiting:
            relative = self._unannounced.popleft()
            self._announced += 1
            if self._progress is not None:
                self._progress(relative, self._announced, self._total)
