"""The Document Intelligence PDF parser, driven through the real SDK against a REST-level
fake of the analyze API on loopback (202 + Operation-Location, then polling GETs)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import azure.identity
import pytest
from azure.core.credentials import AzureKeyCredential
from azure.identity import ClientAssertionCredential, ClientSecretCredential
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from client_api.settings import SettingsError, load_settings
from knowledge.contracts import DocumentParseDeferred, DocumentParseError
from knowledge.ingestion.chunking import chunk_sections
from knowledge.ingestion.document_intelligence import (
    INSTALL_HINT,
    DocumentIntelligenceParser,
    DocumentIntelligenceUnavailable,
)
from knowledge.ingestion.parsers import ParsedDocument, ParsedSection, parse_document
from knowledge.settings import DocumentIntelligenceSettings, KnowledgeSettings
from tests.knowledge.factories import make_pdf
from tests.support.bot_framework import EntraTenant, running_entra_tenant
from tests.support.document_intelligence_fake import (
    INTERNAL_SERVER_ERROR,
    SERVICE_UNAVAILABLE,
    CountedCloses,
    FakeDocumentIntelligence,
    Layout,
)
from tests.support.https import serve_https
from tests.support.processes import free_port

COGNITIVE_SERVICES_SCOPE = "https://cognitiveservices.azure.com/.default"


@pytest.fixture
def service(served: FakeDocumentIntelligence) -> Iterator[FakeDocumentIntelligence]:
    served.calls.clear()
    yield served
    served.hold = False
    served.failing = None
    served.running_polls = 1
    served.accept_token = None
    served._failures.clear()


def di_parser(
    service: FakeDocumentIntelligence, credential: Any = None, **options: Any
) -> DocumentIntelligenceParser:
    """A parser for the fake: its certificate trusted, polls and retries quick."""
    options = {
        "polling_interval_s": 0.01,
        "retry_backoff_factor": 0.01,
        "retry_total": 3,
        "connection_verify": service.ca_file,
        **options,
    }
    return DocumentIntelligenceParser(
        service.endpoint, credential or AzureKeyCredential(service.api_key), **options
    )


HEADER = "Contoso Ltd - Internal"
INTRO = "This policy applies to every employee who travels for work."
BOOKING = "Book flights at least 14 days ahead unless a manager approves."
PORTAL = "Book through the travel portal; receipts are attached automatically."
EXPENSES = "Claim expenses within 30 days of returning."
FOOTNOTE = "Caps include tips and taxes."


def travel_policy(path: Path, service: FakeDocumentIntelligence) -> Path:
    """A two-page PDF and its layout: running headers, footers and page numbers, a title,
    two headings, a section crossing the page break, and two tables (one with a cell
    spanning two rows)."""
    document = make_pdf(
        path,
        [
            [HEADER, "Travel Policy 2025", INTRO, "1. Booking", BOOKING, "Class | Who | Limit"],
            [HEADER, PORTAL, "2. Expenses", EXPENSES, "Category | Item | Cap", FOOTNOTE],
        ],
    ).read_bytes()
    layout = (
        Layout()
        .paragraph(HEADER, page=1, role="pageHeader")
        .paragraph("Travel Policy 2025", page=1, role="title")
        .paragraph(INTRO, page=1)
        .paragraph("1. Booking", page=1, role="sectionHeading")
        .paragraph(BOOKING, page=1)
        .table(
            [
                ["Class", "Who", "Limit"],
                ["Economy", "Everyone", "Any flight"],
                ["Business", "Directors", "Flights over 6 hours"],
            ],
            page=1,
        )
        .paragraph("Confidential", page=1, role="pageFooter")
        .paragraph("1", page=1, role="pageNumber")
        .paragraph(HEADER, page=2, role="pageHeader")
        .paragraph(PORTAL, page=2)
        .paragraph("2. Expenses", page=2, role="sectionHeading")
        .paragraph(EXPENSES, page=2)
        .table(
            [
                ["Category", "Item", "Cap"],
                ["Meals", "Breakfast", "15 EUR"],
                [None, "Dinner", "40 EUR"],
                ["Taxis", "", "Receipt needed"],
            ],
            page=2,
        )
        .paragraph(FOOTNOTE, page=2, role="footnote")
        .paragraph("Confidential", page=2, role="pageFooter")
        .paragraph("2", page=2, role="pageNumber")
    )
    service.add_layout(document, layout)
    return path


# --- mapping ------------------------------------------------------------------------------


def test_the_layout_maps_to_titled_headed_paged_sections_with_tables(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)

    parsed = parse_document(path, pdf=di_parser(service))

    assert parsed == ParsedDocument(
        title="Travel Policy 2025",
        sections=(
            ParsedSection(text=INTRO, page=1),
            ParsedSection(
                text=f"{BOOKING}\n\n"
                "Class | Who | Limit\n"
                "Economy | Everyone | Any flight\n"
                "Business | Directors | Flights over 6 hours",
                page=1,
                heading="1. Booking",
            ),
            # The section goes on over the page break: same heading, its own page.
            ParsedSection(text=PORTAL, page=2, heading="1. Booking"),
            ParsedSection(
                text=f"{EXPENSES}\n\n"
                "Category | Item | Cap\n"
                "Meals | Breakfast | 15 EUR\n"
                "Meals | Dinner | 40 EUR\n"
                "Taxis | | Receipt needed\n\n"
                f"{FOOTNOTE}",
                page=2,
                heading="2. Expenses",
            ),
        ),
    )
    # What the SDK sent: the file's bytes, then polls of the operation until it ended.
    [post, *polls] = service.calls
    assert (post.method, post.path, post.content_type, post.authorization) == (
        "POST",
        "/documentintelligence/documentModels/prebuilt-layout:analyze",
        "application/octet-stream",
        "key",
    )
    assert [call.method for call in polls] == ["GET", "GET"]  # running, then succeeded
    assert polls[0].path.startswith("/documentintelligence/documentModels/prebuilt-layout/")


def test_other_files_keep_the_local_parsers(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    note = tmp_path / "note.md"
    note.write_text("# Note\n\nLocal text.\n")
    assert parse_document(note, pdf=di_parser(service)).sections[0].text == "Local text."
    assert service.calls == []


def test_long_tables_are_chunked_between_rows_with_their_header(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    rows = [["Code", "Office", "Address"]] + [
        [f"C{n:03d}", f"Office number {n}", f"{n} Harbour Street, Seaport district"]
        for n in range(60)
    ]
    document = make_pdf(tmp_path / "offices.pdf", [["Offices"]]).read_bytes()
    service.add_layout(
        document,
        Layout().paragraph("Offices", page=1, role="sectionHeading").table(rows, page=1),
    )

    parsed = di_parser(service)(tmp_path / "offices.pdf")
    chunks = chunk_sections(parsed.sections, chunk_words=60, overlap_words=10)

    written = {" | ".join(row) for row in rows}
    assert len(chunks) > 5
    for chunk in chunks:
        lines = chunk.text.split("\n")
        assert lines[0] == "Code | Office | Address"
        assert set(lines) <= written  # every line a whole row
        assert (chunk.page, chunk.section) == (1, "Offices")
    body = [line for chunk in chunks for line in chunk.text.split("\n")[1:]]
    assert body == [" | ".join(row) for row in rows[1:]]  # each row once, in order


def test_a_table_across_pages_stays_whole_and_a_one_column_table_is_a_list(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    document = make_pdf(tmp_path / "steps.pdf", [["Steps"], ["More steps"]]).read_bytes()
    service.add_layout(
        document,
        Layout()
        .paragraph("Rotation", page=1, role="sectionHeading")
        .table(
            [["Week", "Engineer"], ["1", "Ana"], ["2", "Ben"], ["3", "Chen"]],
            page=1,
            row_pages=[1, 1, 2, 2],
        )
        .paragraph("Checklist", page=2, role="sectionHeading")
        .table([["Check the pager"], ["Read the handover"]], page=2),
    )

    parsed = di_parser(service)(tmp_path / "steps.pdf")

    assert parsed.sections == (
        ParsedSection(
            text="Week | Engineer\n1 | Ana\n2 | Ben\n3 | Chen", page=1, heading="Rotation"
        ),
        ParsedSection(text="Check the pager\n\nRead the handover", page=2, heading="Checklist"),
    )


@pytest.mark.parametrize(
    ("metadata", "layout", "expected"),
    [
        ("Metadata Title", Layout().paragraph("Body text.", page=1), "Metadata Title"),
        (
            None,
            Layout()
            .paragraph("Body first.", page=1)
            .paragraph("Heading", page=1, role="sectionHeading")
            .paragraph("More.", page=1),
            "Heading",
        ),
        (None, Layout().paragraph("First line of text.", page=1), "First line of text."),
    ],
)
def test_without_a_title_paragraph_the_local_fallbacks_name_the_document(
    tmp_path: Path,
    service: FakeDocumentIntelligence,
    metadata: str | None,
    layout: Layout,
    expected: str,
) -> None:
    document = make_pdf(tmp_path / "doc.pdf", [["Body text."]], title=metadata).read_bytes()
    service.add_layout(document, layout)
    assert di_parser(service)(tmp_path / "doc.pdf").title == expected


def test_a_document_with_headers_and_footers_only_has_no_text(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    document = make_pdf(tmp_path / "blank.pdf", [["Header"]]).read_bytes()
    service.add_layout(
        document,
        Layout()
        .paragraph("Header", page=1, role="pageHeader")
        .paragraph("1", page=1, role="pageNumber"),
    )
    with pytest.raises(DocumentParseError, match="no extractable text"):
        di_parser(service)(tmp_path / "blank.pdf")


# --- files the service refuses: skipped ---------------------------------------------------


def test_a_corrupt_file_is_a_parse_error_naming_the_service_reason(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\ngarbage without xref")
    with pytest.raises(DocumentParseError) as caught:
        di_parser(service)(path)
    assert str(caught.value).startswith("broken.pdf: Document Intelligence rejected it: ")
    assert "corrupted or format is unsupported" in str(caught.value)
    assert "(InvalidContent)" in str(caught.value)


def test_a_pdf_that_cannot_be_opened_is_a_parse_error(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    with pytest.raises(DocumentParseError, match=r"gone.pdf: cannot read file"):
        parse_document(tmp_path / "gone.pdf", pdf=di_parser(service))
    assert service.calls == []


def test_an_analysis_that_fails_is_a_parse_error(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = make_pdf(tmp_path / "locked.pdf", [["Locked"]], password="secret")

    with pytest.raises(
        DocumentParseError, match=r"locked.pdf: .* failed to analyse it: .*"
    ) as caught:
        di_parser(service)(path)
    assert "(InvalidContent)" in str(caught.value)
    assert not isinstance(caught.value, DocumentParseDeferred)  # the file's fault: skipped
    assert [call.method for call in service.calls] == ["POST", "GET", "GET"]


# --- the service failing on a file, this time: deferred ------------------------------------


@pytest.mark.parametrize("error", [INTERNAL_SERVER_ERROR, SERVICE_UNAVAILABLE])
def test_an_analysis_the_service_fails_is_deferred(
    tmp_path: Path, service: FakeDocumentIntelligence, error: dict[str, str]
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    service.failing = error
    with pytest.raises(DocumentParseDeferred) as caught:
        di_parser(service)(path)
    assert str(caught.value).startswith("travel.pdf: Document Intelligence could not analyse it")
    assert f"({error['code']})" in str(caught.value)

    service.failing = None  # the next try succeeds
    assert di_parser(service)(path).title == "Travel Policy 2025"


def test_an_analysis_over_its_time_limit_is_deferred(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = tmp_path / "slow.pdf"
    make_pdf(path, [["Slow"]])
    service.hold = True
    with pytest.raises(DocumentParseDeferred, match=r"slow.pdf: .* did not finish .* within 0.2 s"):
        di_parser(service, timeout_s=0.2)(path)

    # The SDK's poller carries on in its thread until the service ends the analysis.
    service.hold = False
    deadline = time.monotonic() + 10
    while service.unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.unfinished() == 0


# --- throttling: retried by azure-core ----------------------------------------------------


def test_a_throttled_request_succeeds_through_the_sdk_retry(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    service.fail_next(429, retry_after="0")
    service.fail_next(503, on="poll")

    parsed = di_parser(service)(path)

    assert parsed.title == "Travel Policy 2025"
    methods = [call.method for call in service.calls]
    assert methods == ["POST", "POST", "GET", "GET", "GET"]  # 429, 202; 503, running, done


def test_throttling_that_outlasts_the_retries_stops_the_run(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    service.fail_next(429, retry_after="0", times=3)
    with pytest.raises(DocumentIntelligenceUnavailable, match=r"answered 429 .* after retries"):
        di_parser(service, retry_total=2)(path)
    assert len(service.calls) == 3


# --- a service that cannot be used: the run stops -----------------------------------------


def test_a_wrong_key_is_a_clear_stop(tmp_path: Path, service: FakeDocumentIntelligence) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    with pytest.raises(DocumentIntelligenceUnavailable) as caught:
        di_parser(service, AzureKeyCredential("wrong"))(path)
    message = str(caught.value)
    assert "refused the credentials" in message
    assert "LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__API_KEY" in message
    assert not isinstance(caught.value, DocumentParseError)


def test_a_refused_content_type_is_a_clear_stop_not_a_skip(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    # 415 refuses the request's content type, which is the same for every PDF.
    path = travel_policy(tmp_path / "travel.pdf", service)
    service.fail_next(415)
    with pytest.raises(DocumentIntelligenceUnavailable) as caught:
        parse_document(path, pdf=di_parser(service))
    assert "answered 415 while analysing travel.pdf: Request content type" in str(caught.value)
    assert [call.method for call in service.calls] == ["POST"]  # not retried


def test_a_client_setting_that_cannot_be_read_is_a_clear_stop_not_a_skip(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    # The HTTP client reads its CA bundle when it connects, raising an OSError of its own.
    path = travel_policy(tmp_path / "travel.pdf", service)
    parser = di_parser(service, connection_verify=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(DocumentIntelligenceUnavailable, match="could not be reached"):
        parse_document(path, pdf=parser)
    assert service.calls == []


def test_an_unknown_model_is_a_clear_stop(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    with pytest.raises(DocumentIntelligenceUnavailable, match="no model 'prebuilt-layuot'"):
        di_parser(service, model_id="prebuilt-layuot")(path)


def test_an_unreachable_endpoint_is_a_clear_stop(tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    make_pdf(path, [["Text"]])
    parser = DocumentIntelligenceParser(
        f"https://127.0.0.1:{free_port()}",
        AzureKeyCredential("key"),
        retry_total=1,
        retry_backoff_factor=0.01,
    )
    with pytest.raises(DocumentIntelligenceUnavailable, match="could not be reached"):
        parser(path)


# --- Entra ID -----------------------------------------------------------------------------


def client_secret_credential(tenant: EntraTenant, secret: str) -> ClientSecretCredential:
    """azure-identity's app credential, asking the loopback tenant for its tokens."""
    return ClientSecretCredential(
        tenant.tenant,
        tenant.client_id,
        secret,
        authority=tenant.base_url,
        disable_instance_discovery=True,
        connection_verify=tenant.ca_file,
    )


def test_entra_tokens_authenticate_without_a_key(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    with running_entra_tenant() as tenant:
        service.accept_token = lambda token: token in tenant.issued
        with client_secret_credential(tenant, tenant.client_secret) as credential:
            parsed = di_parser(service, credential)(path)

    assert parsed.title == "Travel Policy 2025"
    assert {call.authorization for call in service.calls} == {"bearer"}
    assert [request.scope for request in tenant.token_requests] == [COGNITIVE_SERVICES_SCOPE]


def test_an_identity_entra_refuses_is_a_clear_stop(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    with (
        running_entra_tenant() as tenant,
        client_secret_credential(tenant, "not-the-secret") as credential,
        pytest.raises(DocumentIntelligenceUnavailable, match="got no token"),
    ):
        di_parser(service, credential)(path)
    assert service.calls == []


def test_close_closes_the_credential_the_parser_made(
    tmp_path: Path, service: FakeDocumentIntelligence, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    made: list[CountedCloses] = []
    with running_entra_tenant() as tenant:
        service.accept_token = lambda token: token in tenant.issued

        def default_credential() -> CountedCloses:
            made.append(CountedCloses(client_secret_credential(tenant, tenant.client_secret)))
            return made[-1]

        monkeypatch.setattr(azure.identity, "DefaultAzureCredential", default_credential)
        parser = DocumentIntelligenceParser(
            service.endpoint, polling_interval_s=0.01, connection_verify=service.ca_file
        )
        parser.close()  # nothing made yet: nothing to close
        assert made == []

        parser(path)
        parser(path)
        assert [credential.closes for credential in made] == [0]  # one, kept for its cache
        parser.close()
        parser.close()
        assert [credential.closes for credential in made] == [1]

        assert parser(path).title == "Travel Policy 2025"  # usable again, with a new one
        parser.close()
        assert [credential.closes for credential in made] == [1, 1]
    assert {call.authorization for call in service.calls} == {"bearer"}


def test_close_leaves_a_credential_passed_in_open(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    path = travel_policy(tmp_path / "travel.pdf", service)
    with running_entra_tenant() as tenant:
        service.accept_token = lambda token: token in tenant.issued
        credential = CountedCloses(client_secret_credential(tenant, tenant.client_secret))
        parser = di_parser(service, credential)
        parser(path)
        parser.close()
        assert credential.closes == 0  # its owner's to close
        parser(path)
        credential.close()


UNKNOWN_APPLICATION = {
    "error": "unauthorized_client",
    "error_description": "AADSTS700016: Application with identifier 'lamina-ingest' was not "
    "found in the directory 'contoso'.",
    "error_codes": [700016],
}


@contextmanager
def entra_not_knowing_the_application() -> Iterator[tuple[str, str]]:
    """A token endpoint answering as Entra ID does for an application it does not know
    (400); yields its authority and the CA file to trust it."""

    async def token(request: Request) -> JSONResponse:
        return JSONResponse(UNKNOWN_APPLICATION, status_code=400)

    app = Starlette(routes=[Route("/{tenant}/oauth2/v2.0/token", token, methods=["POST"])])
    with serve_https(app, "the Entra ID token endpoint") as (port, cert):
        yield f"https://127.0.0.1:{port}", str(cert)


def test_a_token_request_entra_refuses_with_400_is_a_clear_stop_not_a_skip(
    tmp_path: Path, service: FakeDocumentIntelligence
) -> None:
    # This credential keeps Entra's answer on its error, so the error carries Entra's
    # 400; it must not pass for the service's 400 about the file.
    path = travel_policy(tmp_path / "travel.pdf", service)
    with entra_not_knowing_the_application() as (authority, ca_file):
        credential = ClientAssertionCredential(
            "contoso",
            "lamina-ingest",
            lambda: "federated-assertion",
            authority=authority,
            connection_verify=ca_file,
        )
        with pytest.raises(DocumentIntelligenceUnavailable, match=r"got no token: .*AADSTS700016"):
            parse_document(path, pdf=di_parser(service, credential))
    assert service.calls == []


# --- installation and settings ------------------------------------------------------------


def test_without_the_sdk_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules is how Python marks a module as absent.
    monkeypatch.setitem(sys.modules, "azure.ai.documentintelligence", None)
    settings = DocumentIntelligenceSettings(endpoint="https://di.example.com", api_key="k")
    with pytest.raises(DocumentIntelligenceUnavailable) as caught:
        DocumentIntelligenceParser.from_settings(settings)
    assert INSTALL_HINT in str(caught.value)
    assert INSTALL_HINT == "pip install 'lamina[document-intelligence]'"


def test_the_document_intelligence_parser_needs_an_endpoint() -> None:
    with pytest.raises(ValidationError, match="LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT"):
        KnowledgeSettings(pdf_parser="document_intelligence")
    KnowledgeSettings(pdf_parser="local")  # the default needs nothing
    settings = KnowledgeSettings(
        pdf_parser="document_intelligence",
        document_intelligence=DocumentIntelligenceSettings(endpoint="https://di.example.com"),
    )
    assert settings.document_intelligence.model_id == "prebuilt-layout"
    assert settings.document_intelligence.api_key is None  # Entra ID


def test_a_missing_endpoint_is_a_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("LAMINA_KNOWLEDGE__PDF_PARSER", "document_intelligence")
    with pytest.raises(SettingsError, match="LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT"):
        load_settings()
    monkeypatch.setenv("LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT", "not a url")
    with pytest.raises(SettingsError, match="LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT"):
        load_settings()
    # The key travels in a header: never over plain HTTP.
    monkeypatch.setenv("LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT", "http://di.example")
    with pytest.raises(SettingsError, match="LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT"):
        load_settings()
    monkeypatch.setenv("LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT", "https://di.example")
    assert load_settings().knowledge.pdf_parser == "document_intelligence"
