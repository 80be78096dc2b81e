"""A REST-level fake of Azure AI Document Intelligence's analyze API (``2024-11-30``),
served over HTTPS on loopback for the real SDK.

The protocol, as the service speaks it:

- ``POST /documentintelligence/documentModels/{modelId}:analyze?api-version=2024-11-30``
  with the document as ``application/octet-stream`` (or JSON ``base64Source``) answers
  ``202`` with an ``Operation-Location`` header and no body;
- ``GET`` that location answers ``{"status": "running"}`` (``running_polls`` times),
  then ``{"status": "succeeded", "analyzeResult": {...}}`` or ``{"status": "failed",
  "error": {...}}``.

What it checks, as the service would: the ``Ocp-Apim-Subscription-Key`` header or a
bearer token ``accept_token`` approves (else 401), the API version and the model (else
404), the content type (else 415), and the document: bytes that are no readable PDF are
refused at once (400 ``InvalidRequest`` / ``InvalidContent``); an encrypted PDF is
accepted and its analysis fails with the same error (the service reports bad content
either way).

What it answers: the layout registered for the document's bytes (:meth:`add_layout`,
built with :class:`Layout` in the service's shape: ``content`` holds every line in
reading order and paragraphs, table cells and tables point into it with spans; cell
text is also reported as paragraphs, as the service does), else a plain layout read
with pypdf: each line of each page a paragraph, without roles. :meth:`fail_next`
injects failures (429 with ``Retry-After``, 503, ...) into the next analyze requests or
polls; ``hold`` keeps analyses running until it is cleared; ``failing`` makes every
analysis end ``failed`` with the given error (:data:`INTERNAL_SERVER_ERROR`, ...).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.https import serve_https

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken
    from azure.identity import ClientSecretCredential

API_VERSION = "2024-11-30"
MODELS = frozenset({"prebuilt-layout", "prebuilt-read"})
INVALID_CONTENT = {
    "code": "InvalidRequest",
    "message": "Invalid request.",
    "innererror": {
        "code": "InvalidContent",
        "message": "The file is corrupted or format is unsupported. Refer to documentation "
        "for the list of supported formats.",
    },
}
INTERNAL_SERVER_ERROR = {"code": "InternalServerError", "message": "An unexpected error occurred."}
SERVICE_UNAVAILABLE = {
    "code": "ServiceUnavailable",
    "message": "A transient error occurred. Try again.",
}
ACCESS_DENIED = {
    "code": "401",
    "message": "Access denied due to invalid subscription key or wrong API endpoint. Make "
    "sure to provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource.",
}
UNSUPPORTED_MEDIA_TYPE = {
    "code": "UnsupportedMediaType",
    "message": "Request content type is not supported.",
}
_ANALYZE = re.compile(r"^/documentintelligence/documentModels/([^/:]+):analyze$")
_RESULT = re.compile(r"^/documentintelligence/documentModels/([^/:]+)/analyzeResults/([^/]+)$")


# --- analyze results ---------------------------------------------------------------------


def _polygon(line: int) -> list[float]:
    top = 1.0 + 0.3 * line
    return [1.0, top, 7.5, top, 7.5, top + 0.25, 1.0, top + 0.25]


class Layout:
    """An ``analyzeResult`` of ``prebuilt-layout``, built in reading order."""

    def __init__(self, model_id: str = "prebuilt-layout") -> None:
        self.model_id = model_id
        self._content = ""
        self._lines: dict[int, list[dict[str, Any]]] = {}
        self._page_spans: dict[int, list[int]] = {}
        self.paragraphs: list[dict[str, Any]] = []
        self.tables: list[dict[str, Any]] = []

    def _text(self, text: str, page: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Append ``text`` as a line of ``page``; its span and bounding regions."""
        if self._content:
            self._content += "\n"
        span = {"offset": len(self._content), "length": len(text)}
        self._content += text
        lines = self._lines.setdefault(page, [])
        region = [{"pageNumber": page, "polygon": _polygon(len(lines))}]
        lines.append({"content": text, "polygon": region[0]["polygon"], "spans": [span]})
        bounds = self._page_spans.setdefault(page, [span["offset"], 0])
        bounds[1] = span["offset"] + span["length"]
        return span, region

    def paragraph(self, text: str, *, page: int, role: str | None = None) -> Layout:
        span, regions = self._text(text, page)
        entry: dict[str, Any] = {"spans": [span], "boundingRegions": regions, "content": text}
        if role is not None:
            entry["role"] = role
        self.paragraphs.append(entry)
        return self

    def table(
        self,
        rows: Sequence[Sequence[str | None]],
        *,
        page: int,
        row_pages: Sequence[int] | None = None,
        header_rows: int = 1,
    ) -> Layout:
        """A table of ``rows`` (``None``: covered by the cell above, which spans down),
        on ``page`` or, row by row, on ``row_pages``."""
        pages = list(row_pages) if row_pages is not None else [page] * len(rows)
        cells: list[dict[str, Any]] = []
        above: dict[int, dict[str, Any]] = {}
        first = len(self._content) + (1 if self._content else 0)
        for row_index, row in enumerate(rows):
            for column_index, text in enumerate(row):
                if text is None:
                    above[column_index]["rowSpan"] = above[column_index].get("rowSpan", 1) + 1
                    continue
                cell: dict[str, Any] = {
                    "kind": "columnHeader" if row_index < header_rows else "content",
                    "rowIndex": row_index,
                    "columnIndex": column_index,
                    "content": text,
                    "boundingRegions": [
                        {"pageNumber": pages[row_index], "polygon": _polygon(row_index)}
                    ],
                    "spans": [],
                }
                if text:
                    span, regions = self._text(text, pages[row_index])
                    cell["spans"] = [span]
                    cell["elements"] = [f"/paragraphs/{len(self.paragraphs)}"]
                    self.paragraphs.append(
                        {"spans": [span], "boundingRegions": regions, "content": text}
                    )
                cells.append(cell)
                above[column_index] = cell
        self.tables.append(
            {
                "rowCount": len(rows),
                "columnCount": max(len(row) for row in rows),
                "cells": cells,
                "boundingRegions": [
                    {"pageNumber": number, "polygon": _polygon(0)}
                    for number in dict.fromkeys(pages)
                ],
                "spans": [{"offset": first, "length": len(self._content) - first}],
            }
        )
        return self

    def result(self) -> dict[str, Any]:
        pages = [
            {
                "pageNumber": number,
                "angle": 0,
                "width": 8.5,
                "height": 11,
                "unit": "inch",
                "words": [],
                "lines": self._lines.get(number, []),
                "spans": [{"offset": start, "length": end - start}],
            }
            for number, (start, end) in sorted(self._page_spans.items())
        ]
        return {
            "apiVersion": API_VERSION,
            "modelId": self.model_id,
            "stringIndexType": "textElements",
            "content": self._content,
            "contentFormat": "text",
            "pages": pages,
            "paragraphs": self.paragraphs,
            "tables": self.tables,
        }


def plain_layout(document: bytes, model_id: str) -> dict[str, Any]:
    """What the fake answers for a PDF with no registered layout: its text, read with
    pypdf, a paragraph per line. Raises ``ValueError`` for bytes that are no PDF."""
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(document))
    layout = Layout(model_id)
    for number, page in enumerate(reader.pages, start=1):
        for line in (page.extract_text() or "").splitlines():
            if line.strip():
                layout.paragraph(line.strip(), page=number)
    return layout.result()


# --- the service -------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    authorization: str
    """``key``, ``bearer`` or ``none``."""
    content_type: str | None


@dataclass
class _Operation:
    model_id: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    polls_left: int
    created: str
    reported: bool = False
    """Whether a poll has answered how it ended."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, error: Mapping[str, Any]) -> tuple[int, Any, dict[str, str]]:
    return status, {"error": dict(error)}, {}


@dataclass
class FakeDocumentIntelligence:
    api_key: str = "fake-document-intelligence-key"
    accept_token: Callable[[str], bool] | None = None
    """Approves bearer tokens (Entra ID); ``None``: only the key is accepted."""
    running_polls: int = 1
    """Polls answered ``running`` before an analysis ends."""
    hold: bool = False
    """While set, every analysis stays ``running``."""
    failing: dict[str, Any] | None = None
    """While set, every analysis accepted ends ``failed`` with this error."""
    endpoint: str = ""
    ca_file: str = ""
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    analyzed: list[str] = field(default_factory=list)
    """sha256 of every document accepted for analysis, in order."""
    _operations: dict[str, _Operation] = field(default_factory=dict)
    _failures: deque[tuple[str, int, dict[str, str]]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_layout(self, document: bytes, layout: Layout | dict[str, Any]) -> None:
        """Answer ``layout`` for an analysis of exactly these bytes."""
        result = layout.result() if isinstance(layout, Layout) else layout
        self.layouts[hashlib.sha256(document).hexdigest()] = result

    def fail_next(
        self,
        status: int,
        *,
        on: str = "analyze",
        times: int = 1,
        retry_after: str | None = None,
    ) -> None:
        """Answer the next ``times`` analyze requests (``on="analyze"``) or polls
        (``on="poll"``) with ``status``, and ``Retry-After`` when given."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._failures.extend([(on, status, headers)] * times)

    def unfinished(self) -> int:
        """Analyses whose end no poll has reported yet."""
        with self._lock:
            return sum(not operation.reported for operation in self._operations.values())

    def _authorization(self, headers: Mapping[str, str]) -> str:
        if headers.get("ocp-apim-subscription-key") == self.api_key:
            return "key"
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if (
            scheme.lower() == "bearer"
            and self.accept_token is not None
            and self.accept_token(token)
        ):
            return "bearer"
        return "none"

    def _injected(self, on: str) -> tuple[int, Any, dict[str, str]] | None:
        with self._lock:
            if not self._failures or self._failures[0][0] != on:
                return None
            _, status, headers = self._failures.popleft()
        if status == 415:
            return status, {"error": UNSUPPORTED_MEDIA_TYPE}, headers
        codes = {429: "429", 503: "ServiceUnavailable", 500: "InternalServerError"}
        body = {
            "error": {
                "code": codes.get(status, str(status)),
                "message": "Requests to the Analyze Document operation have exceeded the rate "
                "limit of your current tier. Please retry after a moment."
                if status == 429
                else "A transient error has occurred. Try again.",
            }
        }
        return status, body, headers

    def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, Any, dict[str, str]]:
        authorization = self._authorization(headers)
        self.calls.append(Call(method, path, authorization, headers.get("content-type")))
        if authorization == "none":
            return _error(401, ACCESS_DENIED)
        if query.get("api-version") != API_VERSION:
            return _error(404, {"code": "404", "message": "Resource not found"})
        analyze, result = _ANALYZE.match(path), _RESULT.match(path)
        if method == "POST" and analyze:
            return self._analyze(analyze.group(1), headers, body)
        if method == "GET" and result:
            return self._poll(result.group(2))
        return _error(404, {"code": "404", "message": "Resource not found"})

    def _analyze(
        self, model_id: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        injected = self._injected("analyze")
        if injected is not None:
            return injected
        if model_id not in MODELS:
            return _error(
                404,
                {
                    "code": "NotFound",
                    "message": "Resource not found.",
                    "innererror": {
                        "code": "ModelNotFound",
                        "message": "The requested model was not found. The model ID may be "
                        "incorrect or the model may have been deleted.",
                    },
                },
            )
        content_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type == "application/json":
            document = base64.b64decode(json.loads(body).get("base64Source") or "")
        elif content_type == "application/octet-stream":
            document = body
        else:
            return _error(415, UNSUPPORTED_MEDIA_TYPE)
        digest = hashlib.sha256(document).hexdigest()
        error: dict[str, Any] | None = self.failing
        layout = self.layouts.get(digest)
        if layout is None:
            if not document.startswith(b"%PDF-"):
                return _error(400, INVALID_CONTENT)
            try:
                from pypdf import PdfReader

                if PdfReader(io.BytesIO(document)).is_encrypted:
                    error = error or INVALID_CONTENT
                else:
                    layout = plain_layout(document, model_id)
            except Exception:
                return _error(400, INVALID_CONTENT)
        operation_id = str(uuid.uuid4())
        with self._lock:
            self._operations[operation_id] = _Operation(
                model_id, layout, error, self.running_polls, _now()
            )
            self.analyzed.append(digest)
        location = (
            f"{self.endpoint}/documentintelligence/documentModels/{model_id}/analyzeResults/"
            f"{operation_id}?api-version={API_VERSION}"
        )
        return 202, None, {"Operation-Location": location, "apim-request-id": operation_id}

    def _poll(self, operation_id: str) -> tuple[int, Any, dict[str, str]]:
        injected = self._injected("poll")
        if injected is not None:
            return injected
        with self._lock:
            operation = self._operations.get(operation_id)
            if operation is None:
                return _error(
                    404,
                    {
                        "code": "NotFound",
                        "message": "Resource not found.",
                        "innererror": {
                            "code": "AnalyzeResultNotFound",
                            "message": "Analyze result not found.",
                        },
                    },
                )
            running = self.hold or operation.polls_left > 0
            if running and not self.hold:
                operation.polls_left -= 1
            operation.reported = not running
        answer: dict[str, Any] = {
            "createdDateTime": operation.created,
            "lastUpdatedDateTime": _now(),
        }
        if running:
            answer["status"] = "running"
        elif operation.error is not None:
            answer.update(status="failed", error=operation.error)
        else:
            answer.update(status="succeeded", analyzeResult=operation.result)
        return 200, answer, {}


def _app(fake: FakeDocumentIntelligence) -> Starlette:
    async def endpoint(request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, answer, extra = fake.handle(
            request.method,
            request.url.path,
            dict(request.query_params),
            headers,
            await request.body(),
        )
        if answer is None:
            return Response(status_code=status, headers=extra)
        return Response(
            json.dumps(answer), status_code=status, headers=extra, media_type="application/json"
        )

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])


@contextmanager
def serve_document_intelligence(
    fake: FakeDocumentIntelligence | None = None,
) -> Iterator[FakeDocumentIntelligence]:
    """Serve ``fake`` (or a new one) over HTTPS on a free loopback port; sets ``endpoint``
    and ``ca_file`` (its self-signed certificate, for the client's ``connection_verify``:
    the SDK sends a bearer token over HTTPS only)."""
    fake = fake or FakeDocumentIntelligence()
    with serve_https(_app(fake), "the Document Intelligence fake") as (port, cert):
        fake.endpoint = f"https://127.0.0.1:{port}"
        fake.ca_file = str(cert)
        yield fake


# --- the parser's own credential ---------------------------------------------------------


class CountedCloses:
    """A real Entra ID credential (of the loopback tenant) that counts the calls to its
    ``close``: what a test puts in place of ``DefaultAzureCredential``, which would look
    for an identity on this machine, to see whether the parser closes what it made."""

    def __init__(self, credential: ClientSecretCredential) -> None:
        self._credential = credential
        self.closes = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return self._credential.get_token(*scopes, **kwargs)

    def close(self) -> None:
        self.closes += 1
        self._credential.close()
