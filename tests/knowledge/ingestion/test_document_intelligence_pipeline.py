"""Ingestion with PDFs parsed by Document Intelligence: the real pipeline and SQLite
index, the real SDK, and the REST-level fake of the analyze API on loopback."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from azure.core.credentials import AzureKeyCredential
from pypdf import PdfReader

from client_api.composition import build_knowledge
from client_api.settings import LaminaSettings
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import Chunk, SearchMode, SearchRequest, SkippedFile
from knowledge.ingestion.document_intelligence import (
    DocumentIntelligenceParser,
    DocumentIntelligenceUnavailable,
)
from knowledge.ingestion.pipeline import IngestionPipeline, chunk_id_for, document_id_for
from knowledge.settings import DocumentIntelligenceSettings, KnowledgeSettings
from tests.knowledge.factories import caller_filter, copy_of_samples
from tests.support.document_intelligence_fake import (
    FakeDocumentIntelligence,
    Layout,
    serve_document_intelligence,
)

ATLAS = "product/atlas-user-guide.pdf"
ATLAS_TITLE = "Contoso Atlas 3.8 User Guide"
README_SKIP = SkippedFile("README.md", "no access rule matches")
READER = caller_filter("contoso", "anyone@contoso.com")


@pytest.fixture(scope="module")
def served() -> Iterator[FakeDocumentIntelligence]:
    with serve_document_intelligence() as fake:
        yield fake


@pytest.fixture
def service(served: FakeDocumentIntelligence) -> Iterator[FakeDocumentIntelligence]:
    served.calls.clear()
    served.analyzed.clear()
    yield served
    served.running_polls = 1


@pytest.fixture
def corpus(tmp_path: Path, service: FakeDocumentIntelligence) -> Path:
    """The sample corpus, with the layout the service would find in its user guide: a
    running header on every page, a numbered heading, then the page's text."""
    root = copy_of_samples(tmp_path)
    guide = root / ATLAS
    layout = Layout()
    for number, page in enumerate(PdfReader(guide).pages, start=1):
        header, heading, *lines = [line for line in page.extract_text().splitlines() if line]
        layout.paragraph(header, page=number, role="pageHeader")
        layout.paragraph(heading, page=number, role="sectionHeading")
        for line in lines:
            layout.paragraph(line, page=number)
        layout.paragraph(str(number), page=number, role="pageNumber")
    service.add_layout(guide.read_bytes(), layout)
    return root


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await index.open()
    yield index
    await index.close()


def di_parser(
    service: FakeDocumentIntelligence, key: str | None = None
) -> DocumentIntelligenceParser:
    return DocumentIntelligenceParser(
        service.endpoint,
        AzureKeyCredential(key or service.api_key),
        polling_interval_s=0.01,
        retry_backoff_factor=0.01,
        connection_verify=service.ca_file,
    )


async def chunks_of(index: SqliteKnowledgeIndex, source: str) -> list[Chunk]:
    document_id = document_id_for("contoso", source)
    found: list[Chunk] = []
    while chunk := await index.get_chunk(chunk_id_for(document_id, len(found)), READER):
        found.append(chunk)
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_pdfs_are_indexed_by_layout_with_pages_and_headings(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence
) -> None:
    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service))

    report = await pipeline.ingest(corpus)

    assert (report.files_seen, report.files_indexed, report.skipped) == (9, 8, (README_SKIP,))
    assert service.analyzed == [sha256(corpus / ATLAS)]  # the other files stay local
    hits = await index.search(SearchRequest("snooze alert 72 hours", 1, SearchMode.TEXT), READER)
    (alert,) = [passage.chunk for passage in hits.passages]
    assert (alert.source, alert.page, alert.section) == (ATLAS, 4, "4. Alerts")
    assert alert.title == ATLAS_TITLE  # the PDF's metadata: the layout has no title
    guide = await chunks_of(index, ATLAS)
    assert [(c.page, c.section) for c in guide] == [
        (1, "1. Getting started"),
        (2, "2. Connecting data"),
        (3, "3. Dashboards and tiles"),
        (4, "4. Alerts"),
    ]
    # Running headers and page numbers are gone from the text.
    assert not any(ATLAS_TITLE in c.text or c.text.splitlines()[-1].isdigit() for c in guide)


async def test_a_corrupt_or_locked_pdf_is_skipped_and_the_rest_indexed(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence
) -> None:
    (corpus / "product" / "broken.pdf").write_bytes(b"%PDF-1.7\ngarbage without xref")
    (corpus / "product" / "scan.pdf").write_bytes(b"\x89PNG\r\n\x1a\n not a pdf")
    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service))

    report = await pipeline.ingest(corpus)

    reasons = {skipped.path: skipped.reason for skipped in report.skipped}
    assert set(reasons) == {"README.md", "product/broken.pdf", "product/scan.pdf"}
    for name in ("broken.pdf", "scan.pdf"):
        assert reasons[f"product/{name}"].startswith(
            f"{name}: Document Intelligence rejected it: The file is corrupted"
        )
    assert report.files_indexed == 8
    assert [c.page for c in await chunks_of(index, ATLAS)] == [1, 2, 3, 4]


async def test_switching_the_pdf_parser_reindexes_the_pdfs_only(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence
) -> None:
    await IngestionPipeline(index, KnowledgeSettings()).ingest(corpus)
    assert service.calls == []  # the local parser
    local = await chunks_of(index, ATLAS)

    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service))
    switched = await pipeline.ingest(corpus)
    again = await pipeline.ingest(corpus)

    assert (switched.files_indexed, switched.files_unchanged) == (1, 7)
    assert (again.files_indexed, again.files_unchanged) == (0, 8)
    assert len(service.analyzed) == 1  # the unchanged PDF is not sent again
    assert local[0].section is None
    assert (await chunks_of(index, ATLAS))[0].section == "1. Getting started"


async def test_refused_credentials_stop_the_run_and_keep_the_index(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence
) -> None:
    await IngestionPipeline(index, KnowledgeSettings()).ingest(corpus)
    indexed = await chunks_of(index, ATLAS)
    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service, "wrong"))

    with pytest.raises(DocumentIntelligenceUnavailable, match="refused the credentials"):
        await pipeline.ingest(corpus)

    # Not skipped, so not deleted: the index still serves the PDF as parsed before.
    assert await chunks_of(index, ATLAS) == indexed


async def test_the_settings_choose_the_pdf_parser(
    corpus: Path,
    tmp_path: Path,
    service: FakeDocumentIntelligence,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The parser built from settings trusts the CAs requests trusts: add the fake's.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", service.ca_file)
    service.running_polls = 0  # the default poll interval is a second
    settings = KnowledgeSettings(
        pdf_parser="document_intelligence",
        document_intelligence=DocumentIntelligenceSettings(
            endpoint=service.endpoint, api_key=service.api_key
        ),
    )

    # As the service composes it: the composition root picks the parser.
    index, pipeline, _ = build_knowledge(
        LaminaSettings(data_dir=tmp_path / "data", knowledge=settings)
    )
    assert isinstance(index, SqliteKnowledgeIndex)
    await index.open()
    try:
        report = await pipeline.ingest(corpus)

        assert report.files_indexed == 8
        assert service.analyzed == [sha256(corpus / ATLAS)]
        assert {call.authorization for call in service.calls} == {"key"}
        assert (await chunks_of(index, ATLAS))[3].section == "4. Alerts"
    finally:
        await index.close()


def test_the_sdk_is_not_imported_until_a_pdf_is_parsed() -> None:
    code = (
        "import sys\n"
        "from client_api.composition import build_pdf_parser\n"
        "from client_api.settings import LaminaSettings\n"
        "settings = LaminaSettings(knowledge={'pdf_parser': 'document_intelligence',\n"
        "    'document_intelligence': {'endpoint': 'https://di.example.com', 'api_key': 'k'}})\n"
        "assert build_pdf_parser(settings) is not None\n"
        "print(sorted(m for m in sys.modules if m.startswith('azure.ai.documentintelligence')))\n"
    )
    root = Path(__file__).resolve().parents[3]
    answer = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert answer.stdout.strip() == "[]"
