"""Incremental ingestion against the real SQLite index: what a content owner relies on
when re-running ``lamina ingest`` over a corpus that changed a little, or not at all."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import (
    AccessFilter,
    EmbeddingIdentity,
    EmbeddingMismatch,
    SearchMode,
    SearchRequest,
)
from knowledge.ingestion.pipeline import IngestionPipeline, document_id_for, embedding_text
from knowledge.settings import KnowledgeSettings
from tests.knowledge.factories import DOCUMENTS, caller_filter, copy_of_samples

INDEXED = len(DOCUMENTS)  # the sample corpus's README matches no ACL rule
ENGINEER = caller_filter("contoso", "sam@contoso.com", "employees", "engineering")
EMPLOYEE = caller_filter("contoso", "kim@contoso.com", "employees")


class Interrupted(Exception):
    """Stands for a crash, a Ctrl-C or a dead embedding service in mid-run."""


class CountingEmbedder:
    """A lexical embedder (hashed bag of words) that records every text it embeds and
    can be told to fail after a number of calls."""

    def __init__(self, model: str = "test-bag-of-words", *, fail_after: int | None = None):
        self._identity = EmbeddingIdentity(model, 32)
        self.fail_after = fail_after
        self.calls: list[list[str]] = []

    @property
    def identity(self) -> EmbeddingIdentity:
        return self._identity

    @property
    def texts(self) -> list[str]:
        return [text for call in self.calls for text in call]

    async def embed(self, texts: Sequence[str], *, tenant_id: str) -> list[tuple[float, ...]]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Interrupted
        self.calls.append(list(texts))
        return [self._vector(text) for text in texts]

    @staticmethod
    def _vector(text: str) -> tuple[float, ...]:
        counts = [0.0] * 32
        for word in text.lower().split():
            counts[hashlib.sha256(word.encode()).digest()[0] % 32] += 1.0
        norm = math.sqrt(sum(value * value for value in counts)) or 1.0
        return tuple(value / norm for value in counts)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return copy_of_samples(tmp_path)


@pytest.fixture
def embedder() -> CountingEmbedder:
    return CountingEmbedder()


@pytest.fixture
def pipeline(index: SqliteKnowledgeIndex, embedder: CountingEmbedder) -> IngestionPipeline:
    return IngestionPipeline(index, KnowledgeSettings(), embedder=embedder, embed_batch_size=8)


async def hybrid_sources(
    index: SqliteKnowledgeIndex, embedder: CountingEmbedder, query: str, access: AccessFilter
) -> set[str]:
    request = SearchRequest(
        query,
        50,
        mode=SearchMode.HYBRID,
        vector=CountingEmbedder._vector(query),
        embedding=embedder.identity,
    )
    return {passage.chunk.source for passage in (await index.search(request, access)).passages}


async def stored_hashes(index: SqliteKnowledgeIndex) -> dict[str, str]:
    return {state.source: state.content_hash for state in await index.documents("contoso")}


async def test_a_first_run_embeds_every_chunk_in_bounded_batches(
    corpus: Path,
    index: SqliteKnowledgeIndex,
    pipeline: IngestionPipeline,
    embedder: CountingEmbedder,
) -> None:
    report = await pipeline.ingest(corpus)

    assert report.files_indexed == INDEXED
    assert len(embedder.texts) == report.chunks_indexed == await index.count_chunks()
    assert all(len(call) <= 8 for call in embedder.calls)
    # Small documents share batches: fewer calls than documents would need one by one.
    assert len(embedder.calls) == math.ceil(report.chunks_indexed / 8)
    assert index.embedding == embedder.identity
    assert "engineering/oncall-runbook.md" in await hybrid_sources(
        index, embedder, "Kestrel rotation", ENGINEER
    )


async def test_embedded_text_carries_title_and_heading(
    corpus: Path,
    index: SqliteKnowledgeIndex,
    pipeline: IngestionPipeline,
    embedder: CountingEmbedder,
) -> None:
    await pipeline.ingest(corpus)
    request = SearchRequest("Kestrel rotation", 1, mode=SearchMode.TEXT)
    (passage,) = (await index.search(request, ENGINEER)).passages

    assert embedding_text(passage.chunk).startswith(f"{passage.chunk.title} — The rotation\n\n")
    assert embedding_text(passage.chunk) in embedder.texts


async def test_reingesting_an_unchanged_corpus_does_no_embedding_work(
    corpus: Path,
    index: SqliteKnowledgeIndex,
    pipeline: IngestionPipeline,
    embedder: CountingEmbedder,
) -> None:
    first = await pipeline.ingest(corpus)
    embedder.calls.clear()
    for path in DOCUMENTS:
        os.utime(corpus / path)  # a new modification time is not a new content

    again = await pipeline.ingest(corpus)

    assert embedder.calls == []
    assert (again.files_indexed, again.chunks_indexed) == (0, 0)
    assert (again.files_unchanged, again.access_updated, again.files_removed) == (INDEXED, 0, 0)
    assert again.skipped == first.skipped
    assert await index.count_chunks() == first.chunks_indexed


async def test_touching_one_file_reindexes_exactly_that_file(
    corpus: Path,
    index: SqliteKnowledgeIndex,
    pipeline: IngestionPipeline,
    embedder: CountingEmbedder,
) -> None:
    await pipeline.ingest(corpus)
    before = await stored_hashes(index)
    embedder.calls.clear()
    faq = corpus / "product" / "atlas-faq.txt"
    faq.write_text(faq.read_text() + "\nQ: Does Atlas support quokka mode?\nA: Yes.\n")

    report = await pipeline.ingest(corpus)

    assert (report.files_indexed, report.files_unchanged) == (1, INDEXED - 1)
    after = await stored_hashes(index)
    assert {source for source in after if after[source] != before[source]} == {
        "product/atlas-faq.txt"
    }
    faq_chunks = [
        state.chunks
        for state in await index.documents("contoso")
        if state.source.endswith("faq.txt")
    ]
    assert len(embedder.texts) == report.chunks_indexed == faq_chunks[0]
    assert all("Atlas" in text for text in embedder.texts)
    request = SearchRequest("quokka mode", 1, mode=SearchMode.TEXT)
    (best,) = (await index.search(request, EMPLOYEE)).passages
    assert best.chunk.source == "product/atlas-faq.txt"


async def test_an_acl_change_alone_updates_permissions_without_reembedding(
    corpus: Path,
    index: SqliteKnowledgeIndex,
    pipeline: IngestionPipeline,
    embedder: CountingEmbedder,
) -> None:
    await pipeline.ingest(corpus)
    assert "engineering/oncall-runbook.md" not in await hybrid_sources(
        index, embedder, "Kestrel rotation", EMPLOYEE
    )
    embedder.calls.clear()
    acl = corpus / "acl.yaml"
    acl.write_text(
        acl.read_text().replace(
            "    groups: [engineering]\n", "    groups: [engineering, employees]\n"
        )
    )

    report = await pipeline.ingest(corpus)

    assert embedder.calls == []
    assert report.files_indexed == 0
    assert report.access_updated == len(
        [s for s in await index.documents("contoso") if s.source.startswith("engineering/")]
    )
    assert report.access_updated + report.files_unchanged == INDEXED
    assert "engineering/oncall-runbook.md" in await hybrid_sources(
        index, embedder, "Kestrel rotation", EMPLOYEE
    )


async def test_sync_removes_documents_whose_file_is_gone(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    await pipeline.ingest(corpus)
    (corpus / "hr" / "leave-policy.md").unlink()

    without_sync = await pipeline.ingest(corpus)
    assert without_sync.files_removed == 0
    assert "hr/leave-policy.md" in await stored_hashes(index)

    report = await pipeline.ingest(corpus, sync=True)

    assert report.files_removed == 1
    assert report.files_unchanged == INDEXED - 1
    assert "hr/leave-policy.md" not in await stored_hashes(index)
    assert await index.count_chunks() == sum(s.chunks for s in await index.documents("contoso"))


async def test_sync_removes_only_under_its_prefix_and_never_uploads(
    corpus: Path, tmp_path: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "mine.md").write_text("# Mine\n\nMy own quokka notes.\n")
    (upload / "acl.yaml").write_text(
        "tenant: contoso\nrules:\n  - match: '**'\n    users: [kim@contoso.com]\n"
    )
    await pipeline.ingest(upload, source_prefix="upload://kim@contoso.com/")
    await pipeline.ingest(corpus, source_prefix="archive/")
    (corpus / "product" / "atlas-faq.txt").unlink()

    # The whole tenant namespace, but no path of a folder can spell an upload's source.
    report = await pipeline.ingest(corpus, sync=True)
    assert report.files_removed == INDEXED  # the archive/ copies, none of them here
    assert set(await stored_hashes(index)) == {
        "upload://kim@contoso.com/mine.md",
        *(path for path in DOCUMENTS if path != "product/atlas-faq.txt"),
    }

    await pipeline.ingest(corpus, source_prefix="archive/")
    (corpus / "hr" / "leave-policy.md").unlink()
    report = await pipeline.ingest(corpus, source_prefix="archive/", sync=True)
    assert report.files_removed == 1
    sources = set(await stored_hashes(index))
    assert "archive/hr/leave-policy.md" not in sources
    assert {"hr/leave-policy.md", "upload://kim@contoso.com/mine.md"} <= sources


async def test_an_interrupted_run_is_finished_by_the_next_without_redoing_work(
    corpus: Path, tmp_path: Path, index: SqliteKnowledgeIndex
) -> None:
    reference = SqliteKnowledgeIndex(tmp_path / "reference.db")
    await reference.open()
    complete = await IngestionPipeline(reference, KnowledgeSettings()).ingest(corpus)
    await reference.close()
    failing = CountingEmbedder(fail_after=3)

    with pytest.raises(Interrupted):
        await IngestionPipeline(
            index, KnowledgeSettings(), embedder=failing, embed_batch_size=4
        ).ingest(corpus)
    done_first = await stored_hashes(index)
    assert 0 < len(done_first) < INDEXED

    resumed = CountingEmbedder()
    report = await IngestionPipeline(
        index, KnowledgeSettings(), embedder=resumed, embed_batch_size=4
    ).ingest(corpus)

    assert report.files_unchanged == len(done_first)
    assert report.files_indexed == INDEXED - len(done_first)
    assert len(await stored_hashes(index)) == INDEXED
    # Every chunk is indexed exactly once, and no file done before was embedded again:
    # the resumed run embeds exactly the chunks the interrupted one did not write.
    assert await index.count_chunks() == complete.chunks_indexed
    written_first = sum(
        state.chunks for state in await index.documents("contoso") if state.source in done_first
    )
    assert len(resumed.texts) == complete.chunks_indexed - written_first
    assert not set(resumed.texts) & set(failing.texts[:written_first])


async def test_changing_the_chunking_reindexes_everything(
    corpus: Path,
    index: SqliteKnowledgeIndex,
    pipeline: IngestionPipeline,
    embedder: CountingEmbedder,
) -> None:
    await pipeline.ingest(corpus)
    finer = IngestionPipeline(index, KnowledgeSettings(chunk_tokens=64), embedder=embedder)

    report = await finer.ingest(corpus)

    assert report.files_indexed == INDEXED
    assert report.chunks_indexed == await index.count_chunks()


async def test_another_embedding_model_is_refused_before_any_work(
    corpus: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    await pipeline.ingest(corpus)
    other = CountingEmbedder("another-model")

    with pytest.raises(EmbeddingMismatch, match=r"'test-bag-of-words'.*'another-model'"):
        await IngestionPipeline(index, KnowledgeSettings(), embedder=other).ingest(corpus)
    assert other.calls == []


async def test_progress_is_reported_in_file_order_once_each_file_is_written(
    corpus: Path, pipeline: IngestionPipeline, embedder: CountingEmbedder
) -> None:
    seen: list[tuple[str, int, int]] = []
    calls_when_announced: list[int] = []

    def progress(name: str, done: int, total: int) -> None:
        seen.append((name, done, total))
        calls_when_announced.append(len(embedder.calls))

    await pipeline.ingest(corpus, progress=progress)

    names = [name for name, _, _ in seen]
    assert names == sorted(names)
    assert [(done, total) for _, done, total in seen] == [(n, 9) for n in range(1, 10)]
    # The last file is announced only after the last batch was embedded (and written).
    assert calls_when_announced[-1] == len(embedder.calls)


def pdf_bytes(*pages: str) -> bytes:
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


async def test_corrupt_encrypted_and_empty_files_are_reported_and_the_rest_ingested(
    corpus: Path, tmp_path: Path, index: SqliteKnowledgeIndex, pipeline: IngestionPipeline
) -> None:
    whole = pdf_bytes("Quarterly quokka census.", "Second page.")
    (corpus / "product" / "truncated.pdf").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "whole.pdf").write_bytes(whole)
    writer = PdfWriter(clone_from=PdfReader(tmp_path / "whole.pdf"))
    writer.encrypt(user_password="secret", algorithm="AES-256")
    with (corpus / "product" / "locked.pdf").open("wb") as file:
        writer.write(file)
    (corpus / "product" / "empty.txt").write_bytes(b"")

    report = await pipeline.ingest(corpus)

    reasons = {skipped.path: skipped.reason for skipped in report.skipped}
    assert "not a readable PDF" in reasons["product/truncated.pdf"]
    assert reasons["product/locked.pdf"] == "locked.pdf: the PDF is encrypted"
    assert reasons["product/empty.txt"] == "empty.txt: no extractable text"
    assert report.files_indexed == INDEXED
    ids = {state.document_id for state in await index.documents("contoso")}
    assert document_id_for("contoso", "product/truncated.pdf") not in ids
