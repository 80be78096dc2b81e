"""PDFs parsed by Azure AI Document Intelligence's layout model (``prebuilt-layout``).

The local PDF parser reads a page's text run; the layout model also says what each
paragraph *is*. The result maps onto the same :class:`ParsedDocument` as every other
parser:

- the title is the paragraph with role ``title`` (else the PDF's metadata title, the
  first heading, the first line, the file name);
- a ``sectionHeading`` paragraph starts a section and becomes its heading;
- a section also ends where the page changes, the heading carrying on, so every chunk
  still cites one page;
- page headers, page footers and page numbers are dropped;
- a table becomes one paragraph at its place in reading order, a line per row and
  ``" | "`` between cells (as HTML and DOCX tables are), so chunking cuts it between
  rows only; the paragraphs the service also reports for its cells are not repeated.
  A cell spanning rows is repeated in each, so a row read alone keeps its value; a
  one-column table becomes one paragraph per row.

The SDK (``lamina[document-intelligence]``) is imported on first use only. The sync
client is used: parsing runs in a worker thread. Throttling (429 with ``Retry-After``)
and transient 5xx answers are retried by azure-core's retry policy (``retry_total``,
``retry_backoff_factor``, ... as client options).

Failures come in three kinds, handled differently:

- the service rejects *this file* (400, 413: corrupt, encrypted, too large or too many
  pages for the tier; or an analysis that ends ``failed`` with any other error, such
  as ``InvalidRequest`` / ``InvalidContent``): :class:`DocumentParseError`, so
  ingestion reports the file as skipped, deletes what the index held of it and goes on
  with the rest;
- the service failed *on this file, this time* (an analysis that ends ``failed`` with
  a service-side error, ``InternalServerError`` or ``ServiceUnavailable``, the error
  guide's 500 and 503 codes, or ``Timeout``; or one still running after
  ``timeout_s``): :class:`DocumentParseDeferred`, so ingestion reports the file as
  skipped but keeps what the index held of it, and the next run tries again. A passing
  fault of the service must not delete good content;
- the service *cannot be used* (the SDK is not installed; a wrong endpoint or model,
  404; a key or Entra identity refused, 401/403, or no token from Entra ID, whatever
  status Entra answered; unreachable, or a client setting that cannot be read, such as
  a missing CA bundle; any other status, 415 included, since every request is sent
  alike; still throttled or failing after the retries):
  :class:`DocumentIntelligenceUnavailable`, which stops the run. Skipping would be
  wrong here: every PDF would fail the same way, and skipping a file deletes its chunks
  from the index, so a wrong key would quietly empty the index of every PDF. Stopped,
  the run leaves what it committed; the next run resumes.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowledge.contracts import DocumentParseDeferred, DocumentParseError, KnowledgeError
from knowledge.ingestion.parsers import (
    ParsedDocument,
    _finish,
    _one_line,
    _SectionBuilder,
    _short_title,
)
from knowledge.settings import DocumentIntelligenceSettings

if TYPE_CHECKING:
    from azure.ai.documentintelligence.models import (
        AnalyzeResult,
        BoundingRegion,
        DocumentSpan,
        DocumentTable,
    )
    from azure.core.credentials import AzureKeyCredential, TokenCredential
    from azure.core.exceptions import HttpResponseError
    from azure.identity import DefaultAzureCredential

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lamina[document-intelligence]'"
DEFAULT_MODEL = "prebuilt-layout"
_SDK = "azure.ai.documentintelligence"
_DROPPED_ROLES = frozenset({"pageHeader", "pageFooter", "pageNumber"})
_REJECTED_FILE = frozenset({400, 413})
"""Statuses that say the request's document is at fault, not the service or the caller.
Not 415: it refuses the request's content type, the same for every file."""
_RETRIED = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses azure-core's retry policy retries."""
_SERVICE_FAULTS = frozenset({"InternalServerError", "ServiceUnavailable", "Timeout"})
"""Top-level codes of a failed analysis that say the service failed, not the file: the
error guide's 500 and 503 codes (for an analysis with several errors, the top-level
code is the most severe one), and ``Timeout``, not in the guide's table, but a time
limit of the service's own, treated as reaching ``timeout_s`` is."""
_MAX_REASON_CHARS = 300


class DocumentIntelligenceUnavailable(KnowledgeError):
    """Document Intelligence cannot be used at all (not installed, misconfigured,
    refusing the credentials, unreachable): the ingestion run stops instead of
    skipping every PDF."""


def require_sdk() -> None:
    """Raise :class:`DocumentIntelligenceUnavailable` unless the SDK is installed
    (checked without importing it)."""
    try:
        found = importlib.util.find_spec(_SDK) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise DocumentIntelligenceUnavailable(
            f"the Document Intelligence PDF parser needs its SDK: {INSTALL_HINT}"
        )


class DocumentIntelligenceParser:
    """A :class:`~knowledge.ingestion.parsers.DocumentParser` for PDFs over the
    Document Intelligence analyze API. Blocking; safe to call from several threads.

    ``credential`` is an ``AzureKeyCredential`` or a sync ``TokenCredential``; ``None``
    means Entra ID through ``DefaultAzureCredential`` (managed identity in Azure), made
    on first use and kept for its token cache. ``client_options`` go to each
    ``DocumentIntelligenceClient`` (``retry_total``, ``retry_backoff_factor``,
    ``connection_verify``, ``read_timeout``, ...). :meth:`close` closes the credential
    the parser made; one passed in is its owner's to close.
    """

    def __init__(
        self,
        endpoint: str,
        credential: AzureKeyCredential | TokenCredential | None = None,
        *,
        model_id: str = DEFAULT_MODEL,
        timeout_s: float = 600.0,
        polling_interval_s: float = 1.0,
        **client_options: Any,
    ) -> None:
        require_sdk()
        self._endpoint = endpoint.rstrip("/")
        self._credential = credential
        self._owned: DefaultAzureCredential | None = None
        """The credential this parser made, and so closes."""
        self._model_id = model_id
        self._timeout_s = timeout_s
        # The SDK's own default is 30 s when the service sends no Retry-After.
        self._polling_interval_s = polling_interval_s
        self._options = client_options
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: DocumentIntelligenceSettings, **client_options: Any
    ) -> DocumentIntelligenceParser:
        """The parser of ``LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__*``: the API key
        when one is set, else Entra ID."""
        if not settings.endpoint:
            raise DocumentIntelligenceUnavailable(
                "the Document Intelligence PDF parser needs an endpoint: set "
                "LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT"
            )
        require_sdk()
        credential: AzureKeyCredential | None = None
        if settings.api_key is not None:
            from azure.core.credentials import AzureKeyCredential

            credential = AzureKeyCredential(settings.api_key.get_secret_value())
        return cls(
            settings.endpoint,
            credential,
            model_id=settings.model_id,
            timeout_s=settings.timeout_s,
            **client_options,
        )

    @property
    def name(self) -> str:
        return f"document_intelligence/{self._model_id}"

    def close(self) -> None:
        """Close the ``DefaultAzureCredential`` this parser made, if it made one (its
        HTTP sessions); a credential passed in is left open. Blocking. The parser stays
        usable: the next PDF makes a new credential."""
        with self._lock:
            owned, self._owned = self._owned, None
            if owned is not None:
                self._credential = None
        if owned is not None:
            owned.close()

    def __call__(self, path: Path) -> ParsedDocument:
        result = self._analyze(path)
        return layout_document(result, path, metadata_title=_pdf_metadata_title(path))

    def _analyze(self, path: Path) -> AnalyzeResult:
        try:
            from azure.ai.documentintelligence import DocumentIntelligenceClient
            from azure.core.exceptions import AzureError, HttpResponseError
        except ImportError as exc:
            raise DocumentIntelligenceUnavailable(
                f"the Document Intelligence PDF parser needs its SDK: {INSTALL_HINT}"
            ) from exc

        try:
            document = path.open("rb")
        except OSError as exc:
            raise DocumentParseError(f"{path.name}: cannot read file ({exc.strerror})") from exc
        try:
            client = DocumentIntelligenceClient(
                self._endpoint,
                self._credential_or_default(),
                polling_interval=self._polling_interval_s,
                **self._options,
            )
            try:
                # Streamed from the file (sent as application/octet-stream); the retry
                # policy rewinds it to send it again after a 429.
                with document:
                    poller = client.begin_analyze_document(self._model_id, document)
                poller.wait(self._timeout_s)
            except BaseException:
                client.close()
                raise
            if not poller.done():
                # The SDK's polling thread cannot be cancelled: it closes the client
                # once the service finishes (the service bounds every analysis).
                poller.add_done_callback(lambda _: client.close())
                raise DocumentParseDeferred(
                    f"{path.name}: Document Intelligence did not finish analysing it "
                    f"within {self._timeout_s:g} s"
                )
            try:
                result: AnalyzeResult = poller.result()
            finally:
                client.close()
            return result
        except HttpResponseError as exc:
            raise self._failure(path, exc) from exc
        except (AzureError, OSError) as exc:
            # An OSError here is not the file's (it is open): the client's configuration
            # (a CA bundle that cannot be read, ...) fails every file alike.
            log.warning("Document Intelligence at %s: %s", self._endpoint, exc)
            raise DocumentIntelligenceUnavailable(
                f"Document Intelligence at {self._endpoint} could not be reached while "
                f"analysing {path.name} ({type(exc).__name__}); ingestion stopped"
            ) from exc
        finally:
            document.close()  # already closed unless the client could not be built

    def _credential_or_default(self) -> AzureKeyCredential | TokenCredential:
        with self._lock:
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                self._credential = self._owned = DefaultAzureCredential()
            return self._credential

    def _failure(self, path: Path, exc: HttpResponseError) -> KnowledgeError:
        """The error of an HTTP failure: the file's fault (skip it) or the service's
        (stop the run)."""
        from azure.core.exceptions import ClientAuthenticationError
        from azure.core.polling.base_polling import OperationFailed

        status = exc.status_code
        # The credential failed before any request reached the service: no status, or,
        # from a credential that keeps Entra ID's (or the managed identity endpoint's)
        # answer, that answer's status, often 400. The service itself refuses with 401.
        no_token = status is None or (isinstance(exc, ClientAuthenticationError) and status != 401)
        detail = (
            f": {_one_line(str(exc))[:_MAX_REASON_CHARS]}" if no_token else _service_message(exc)
        )
        log.warning(
            "Document Intelligence at %s, %s: %s%s", self._endpoint, path.name, status, detail
        )
        if isinstance(exc.inner_exception, OperationFailed):
            if exc.error is not None and exc.error.code in _SERVICE_FAULTS:
                return DocumentParseDeferred(
                    f"{path.name}: Document Intelligence could not analyse it this time{detail}"
                )
            return DocumentParseError(
                f"{path.name}: Document Intelligence failed to analyse it{detail}"
            )
        if no_token or status in (401, 403):
            cause = "got no token" if no_token else "refused the credentials"
            return DocumentIntelligenceUnavailable(
                f"Document Intelligence at {self._endpoint} {cause}{detail}: check "
                "LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__API_KEY, or the Entra identity's "
                "'Cognitive Services User' role on the resource; ingestion stopped"
            )
        if status in _REJECTED_FILE:
            return DocumentParseError(f"{path.name}: Document Intelligence rejected it{detail}")
        if status == 404:
            return DocumentIntelligenceUnavailable(
                f"Document Intelligence at {self._endpoint} has no model "
                f"{self._model_id!r} (404){detail}: check "
                "LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT and MODEL_ID; "
                "ingestion stopped"
            )
        retried = ", after retries" if status in _RETRIED else ""
        return DocumentIntelligenceUnavailable(
            f"Document Intelligence at {self._endpoint} answered {status} while analysing "
            f"{path.name}{retried}{detail}; ingestion stopped"
        )


def _service_message(exc: HttpResponseError) -> str:
    """``": <message> (<code>)"`` from the service's error body, the inner error's when
    there is one (it is the specific one: ``InvalidContent``, ...), else ``""``."""
    error = exc.error
    if error is None:
        return ""
    inner = error.innererror if isinstance(error.innererror, dict) else {}
    code = inner.get("code") or error.code
    message = inner.get("message") or error.message
    if not message:
        return f" ({code})" if code else ""
    text = _one_line(str(message))[:_MAX_REASON_CHARS]
    return f": {text} ({code})" if code else f": {text}"


def _pdf_metadata_title(path: Path) -> str | None:
    """The PDF's metadata title, as the local parser reads it; ``None`` if unreadable."""
    from pypdf import PdfReader

    try:
        metadata = PdfReader(path).metadata
        return metadata.title if metadata is not None else None
    except Exception:
        # Only a fallback title: a file the service read but pypdf cannot is still fine.
        return None


# --- mapping -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Block:
    """A paragraph or a table, placed in reading order by its offset in the content."""

    offset: int
    text: str
    page: int | None
    role: str | None = None
    rows: tuple[str, ...] | None = None
    """A one-column table's rows, each its own paragraph."""


def _role(role: str | Enum | None) -> str | None:
    # Plain strings: the SDK answers its str enum for a known role, a str for a new one.
    return role.value if isinstance(role, Enum) else role


def _first_page(regions: list[BoundingRegion] | None) -> int | None:
    return regions[0].page_number if regions else None


def _start(spans: list[DocumentSpan] | None) -> int | None:
    return min(span.offset for span in spans) if spans else None


def table_rows(table: DocumentTable) -> list[str]:
    """The table's rows as ``"cell | cell"`` lines: a cell spanning rows is repeated in
    each, one spanning columns is written once; empty rows are dropped."""
    grid: dict[tuple[int, int], str] = {}
    for cell in table.cells:
        text = _one_line(cell.content or "")
        for row in range(cell.row_index, cell.row_index + (cell.row_span or 1)):
            grid.setdefault((row, cell.column_index), text)
    rows = []
    for row in range(table.row_count):
        line = " | ".join(grid.get((row, column), "") for column in range(table.column_count))
        if line.strip(" |"):
            rows.append(line)
    return rows


def _blocks(result: AnalyzeResult) -> list[_Block]:
    """Kept paragraphs and tables, in reading order."""
    tables = result.tables or []
    inside = [
        (span.offset, span.offset + span.length) for table in tables for span in table.spans or []
    ]
    blocks: list[_Block] = []
    end = len(result.content or "")
    for table in tables:
        rows = table_rows(table)
        if not rows:
            continue
        start = _start(table.spans)
        if start is None:
            start = min((s for c in table.cells if (s := _start(c.spans)) is not None), default=end)
        page = _first_page(table.bounding_regions)
        if table.column_count > 1:
            blocks.append(_Block(start, "\n".join(rows), page))
        else:
            blocks.append(_Block(start, "", page, rows=tuple(rows)))
    previous = 0
    for paragraph in result.paragraphs or []:
        start = _start(paragraph.spans)
        offset = previous if start is None else start
        previous = offset
        role = _role(paragraph.role)
        if role in _DROPPED_ROLES or any(low <= offset < high for low, high in inside):
            continue
        blocks.append(
            _Block(offset, paragraph.content, _first_page(paragraph.bounding_regions), role)
        )
    # Stable: a paragraph at a table's own offset (a caption) keeps its order after it.
    blocks.sort(key=lambda block: block.offset)
    return blocks


def layout_document(
    result: AnalyzeResult, path: Path, *, metadata_title: str | None = None
) -> ParsedDocument:
    """Map a layout :class:`AnalyzeResult` of ``path`` to a :class:`ParsedDocument`
    (see the module docstring). Raises :class:`DocumentParseError` if no text is left."""
    builder = _SectionBuilder()
    title: str | None = None
    first_heading: str | None = None
    for block in _blocks(result):
        if block.role == "title" and title is None:
            title = _one_line(block.text)
        elif block.role in ("title", "sectionHeading"):
            heading = _one_line(block.text) or None
            first_heading = first_heading or heading
            builder.start(heading)
        elif block.rows is not None:
            for row in block.rows:
                builder.add(row, block.page)
        else:
            builder.add(block.text, block.page)
    sections = builder.build()
    first_line = sections[0].text.split("\n", 1)[0] if sections else None
    chosen = (
        _short_title(title)
        or _short_title(metadata_title)
        or _short_title(first_heading)
        or _short_title(first_line)
    )
    return _finish(path, chosen, sections)
