"""Ingestion with PDFs parsed by Document Intelligence: the real pipeline and SQLite
index, the real SDK, and the REST-level fake of the analyze API on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import azure.identity
import pytest
from azure.core.credentials import AzureKeyCredential
from azure.identity import ClientSecretCredential
from fpdf import FPDF
from pypdf import PdfReader

from client_api.composition import build_knowledge, open_knowledge
from client_api.settings import LaminaSettings
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import AccessFilter, Chunk, SearchMode, SearchRequest, SkippedFile
from knowledge.ingestion.document_intelligence import (
    DocumentIntelligenceParser,
    DocumentIntelligenceUnavailable,
)
from knowledge.ingestion.pipeline import IngestionPipeline, chunk_id_for, document_id_for
from knowledge.settings import DocumentIntelligenceSettings, KnowledgeSettings
from tests.knowledge.factories import caller_filter, copy_of_samples
from tests.support.bot_framework import running_entra_tenant
from tests.support.document_intelligence_fake import (
    INTERNAL_SERVER_ERROR,
    CountedCloses,
    FakeDocumentIntelligence,
    Layout,
)

ATLAS = "product/atlas-user-guide.pdf"
ATLAS_TITLE = "Contoso Atlas 3.8 User Guide"
README_SKIP = SkippedFile("README.md", "no access rule matches")
READER = caller_filter("contoso", "anyone@contoso.com")


@pytest.fixture
def service(served: FakeDocumentIntelligence) -> Iterator[FakeDocumentIntelligence]:
    served.calls.clear()
    served.analyzed.clear()
    yield served
    served.running_polls = 1
    served.failing = None
    served.hold = False
    served.accept_token = None


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


def di_parser(
    service: FakeDocumentIntelligence, key: str | None = None, *, timeout_s: float = 600.0
) -> DocumentIntelligenceParser:
    return DocumentIntelligenceParser(
        service.endpoint,
        AzureKeyCredential(key or service.api_key),
        timeout_s=timeout_s,
        polling_interval_s=0.01,
        retry_backoff_factor=0.01,
        connection_verify=service.ca_file,
    )


async def chunks_of(
    index: SqliteKnowledgeIndex, source: str, reader: AccessFilter = READER
) -> list[Chunk]:
    document_id = document_id_for("contoso", source)
    found: list[Chunk] = []
    while chunk := await index.get_chunk(chunk_id_for(document_id, len(found)), reader):
        found.append(chunk)
    return found


async def guide_found(index: SqliteKnowledgeIndex, query: str) -> list[str]:
    """The user guide's passages among the best three for ``query``."""
    hits = await index.search(SearchRequest(query, 3, SearchMode.TEXT), READER)
    return [passage.chunk.text for passage in hits.passages if passage.chunk.source == ATLAS]


OLD_GUIDE_LINE = "snoozed for up to 72"


NEW_GUIDE_LINE = "Atlas 3.9 replaces alert snoozing with quiet hours per workspace."


def write_new_guide(path: Path) -> None:
    """A new version of the user guide (the service reads it with its plain layout)."""
    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    pdf.add_page()
    pdf.cell(0, 8, NEW_GUIDE_LINE)
    pdf.output(str(path))


async def until_analyses_end(service: FakeDocumentIntelligence) -> None:
    """Wait (10 s at most) for analyses a timed-out parse left behind to end."""
    deadline = time.monotonic() + 10
    while service.unfinished() and time.monotonic() < deadline:  # noqa: ASYNC110 (SDK threads poll)
        await asyncio.sleep(0.01)
    assert service.unfinished() == 0


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


@pytest.mark.parametrize("fault", ["failed analysis", "time limit"])
async def test_a_service_fault_keeps_the_indexed_pdf_and_the_next_run_retries(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence, fault: str
) -> None:
    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service))
    await pipeline.ingest(corpus)
    indexed = await chunks_of(index, ATLAS)
    assert len(indexed) == 4
    write_new_guide(corpus / ATLAS)
    faulty = pipeline
    if fault == "failed analysis":
        service.failing = INTERNAL_SERVER_ERROR
    else:
        service.hold = True
        # The short limit only where the service holds the analysis: a healthy run on a
        # busy machine must not hit it.
        faulty = IngestionPipeline(
            index, KnowledgeSettings(), pdf_parser=di_parser(service, timeout_s=0.3)
        )

    # With --sync, which must not take the deferred file for a deleted one either.
    deferred = await faulty.ingest(corpus, sync=True)

    (skipped,) = [skipped for skipped in deferred.skipped if skipped.path == ATLAS]
    expected = (
        "could not analyse it this time: An unexpected error occurred. (InternalServerError)"
        if fault == "failed analysis"
        else "did not finish analysing it within 0.3 s"
    )
    assert skipped.reason == (
        f"atlas-user-guide.pdf: Document Intelligence {expected}; "
        "the indexed version is kept and the next run retries it"
    )
    assert (deferred.files_indexed, deferred.files_unchanged, deferred.files_removed) == (0, 7, 0)
    assert await chunks_of(index, ATLAS) == indexed  # still served, as parsed before
    assert any(OLD_GUIDE_LINE in text for text in await guide_found(index, "snoozed alert 72"))

    service.failing, service.hold = None, False
    healed = await pipeline.ingest(corpus, sync=True)

    assert (healed.files_indexed, healed.files_unchanged, healed.skipped) == (1, 7, (README_SKIP,))
    (new,) = await chunks_of(index, ATLAS)
    assert NEW_GUIDE_LINE in new.text
    assert await guide_found(index, "quiet hours per workspace") == [new.text]
    assert not any(OLD_GUIDE_LINE in text for text in await guide_found(index, "snoozed alert 72"))
    await until_analyses_end(service)


async def test_a_new_pdf_whose_parse_is_deferred_is_indexed_by_the_next_run(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence
) -> None:
    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service))
    service.failing = INTERNAL_SERVER_ERROR

    first = await pipeline.ingest(corpus)

    (skipped,) = [skipped for skipped in first.skipped if skipped.path == ATLAS]
    assert skipped.reason == (
        "atlas-user-guide.pdf: Document Intelligence could not analyse it this time: "
        "An unexpected error occurred. (InternalServerError); the next run retries it"
    )
    assert first.files_indexed == 7
    assert await chunks_of(index, ATLAS) == []

    service.failing = None
    second = await pipeline.ingest(corpus)

    assert (second.files_indexed, second.files_unchanged) == (1, 7)
    assert [c.page for c in await chunks_of(index, ATLAS)] == [1, 2, 3, 4]


async def test_a_deferred_pdf_keeps_its_chunks_under_its_new_acl(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence
) -> None:
    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service))
    await pipeline.ingest(corpus)
    indexed = await chunks_of(index, ATLAS)
    acl = corpus / "acl.yaml"
    acl.write_text(
        acl.read_text().replace(
            '"product/**"\n    public: true', '"product/**"\n    groups: [product]'
        )
    )
    write_new_guide(corpus / ATLAS)
    service.failing = INTERNAL_SERVER_ERROR

    report = await pipeline.ingest(corpus)

    assert ATLAS in {skipped.path for skipped in report.skipped}
    # Kept, but only for whom the ACL now grants it: a revoked reader loses it at once.
    assert await chunks_of(index, ATLAS) == []
    member = caller_filter("contoso", "pm@contoso.com", "product")
    assert [chunk.text for chunk in await chunks_of(index, ATLAS, member)] == [
        chunk.text for chunk in indexed
    ]


async def test_an_analysis_failing_on_the_file_deletes_its_indexed_chunks(
    corpus: Path, index: SqliteKnowledgeIndex, service: FakeDocumentIntelligence
) -> None:
    pipeline = IngestionPipeline(index, KnowledgeSettings(), pdf_parser=di_parser(service))
    await pipeline.ingest(corpus)
    assert len(await chunks_of(index, ATLAS)) == 4
    # Now encrypted: the service accepts it, and its analysis fails with InvalidContent.
    pdf = FPDF()
    pdf.set_encryption(owner_password="owner", user_password="secret")
    pdf.set_font("Helvetica", size=11)
    pdf.add_page()
    pdf.cell(0, 8, NEW_GUIDE_LINE)
    pdf.output(str(corpus / ATLAS))

    report = await pipeline.ingest(corpus)

    (skipped,) = [skipped for skipped in report.skipped if skipped.path == ATLAS]
    assert skipped.reason.startswith("atlas-user-guide.pdf: Document Intelligence failed to")
    assert skipped.reason.endswith("(InvalidContent)")  # nothing promised about a retry
    assert await chunks_of(index, ATLAS) == []  # a broken file stops being served
    assert await guide_found(index, "snoozed alert 72") == []


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


async def test_open_knowledge_closes_the_credential_the_pdf_parser_made(
    corpus: Path,
    tmp_path: Path,
    service: FakeDocumentIntelligence,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", service.ca_file)
    service.running_polls = 0
    settings = KnowledgeSettings(
        embeddings="hashing",
        pdf_parser="document_intelligence",
        document_intelligence=DocumentIntelligenceSettings(endpoint=service.endpoint),
    )
    made: list[CountedCloses] = []
    with running_entra_tenant() as tenant:
        service.accept_token = lambda token: token in tenant.issued

        def default_credential() -> CountedCloses:
            credential = ClientSecretCredential(
                tenant.tenant,
                tenant.client_id,
                tenant.client_secret,
                authority=tenant.base_url,
                disable_instance_discovery=True,
                connection_verify=tenant.ca_file,
            )
            made.append(CountedCloses(credential))
            return made[-1]

        monkeypatch.setattr(azure.identity, "DefaultAzureCredential", default_credential)

        # As `lamina ingest` composes and runs it.
        async with AsyncExitStack() as stack:
            _, ingestor, _ = await open_knowledge(
                LaminaSettings(data_dir=tmp_path / "data", knowledge=settings), stack
            )
            report = await ingestor.ingest(corpus)
            assert report.files_indexed == 8
            assert [credential.closes for credential in made] == [0]

    assert [credential.closes for credential in made] == [1]
    assert {call.authorization for call in service.calls} == {"bearer"}


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
