"""A loopback fake of Azure AI Content Safety's REST API: ``text:shieldPrompt`` and
``text:analyze``, with the service's authentication, api-version and input limits.

Verdicts are scripted by content: any text containing ``attack_marker`` is an attack,
and ``severities`` maps a word to the (category, severity) it triggers. ``fail_with``
makes every call answer that status with an error body, ``delay_s`` holds every
answer back (to play a slow service), ``malformed`` answers 200 with the wrong shape.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_VERSION = "2024-09-01"
CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
# Words the raw error body carries, so tests can prove they never reach a caller.
LEAKY_ERROR_MESSAGE = "internal trace id 7f3e at node cs-westeurope-12, request body echoed"


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Header names in lower case."""
    body: Any


@dataclass
class FakeContentSafety:
    api_key: str | None = "test-key"
    """The key the fake accepts in ``Ocp-Apim-Subscription-Key``; None: keys are refused."""
    bearer_token: str | None = None
    """The Entra token the fake accepts as ``Authorization: Bearer``; None: tokens refused."""
    attack_marker: str = "ATTACK-MARKER"
    severities: dict[str, tuple[str, int]] = field(default_factory=dict)
    fail_with: int | None = None
    delay_s: float = 0.0
    malformed: bool = False
    requests: list[RecordedRequest] = field(default_factory=list)
    base_url: str = ""
    _release: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        self.requests.clear()
        self.fail_with, self.delay_s, self.malformed = None, 0.0, False
        self.severities.clear()

    # --- the protocol ------------------------------------------------------------

    def answer(
        self, path: str, query: dict[str, list[str]], headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, Any]]:
        if not self._authorized(headers):
            return 401, _error("401", "Access denied due to invalid subscription key or token.")
        if query.get("api-version") != [API_VERSION]:
            return 404, _error("UnsupportedApiVersion", "The API version is not supported.")
        if self.fail_with is not None:
            return self.fail_with, _error("InternalServerError", LEAKY_ERROR_MESSAGE)
        if self.malformed:
            return 200, {"unexpected": True}
        if path == "/contentsafety/text:shieldPrompt":
            return self._shield(body)
        if path == "/contentsafety/text:analyze":
            return self._analyze(body)
        return 404, _error("NotFound", "Resource not found.")

    def _authorized(self, headers: dict[str, str]) -> bool:
        key = headers.get("ocp-apim-subscription-key")
        if key is not None:
            return self.api_key is not None and key == self.api_key
        authorization = headers.get("authorization")
        return self.bearer_token is not None and authorization == f"Bearer {self.bearer_token}"

    def _shield(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, _error("InvalidRequestBody", "The body is not an object.")
        prompt, documents = body.get("userPrompt"), body.get("documents", [])
        if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 10_000):
            return 400, _error("InvalidRequestBody", "userPrompt exceeds 10000 characters.")
        if (
            not isinstance(documents, list)
            or len(documents) > 5
            or not all(isinstance(d, str) for d in documents)
            or sum(len(d) for d in documents) > 10_000
        ):
            return 400, _error("InvalidRequestBody", "At most 5 documents, 10000 characters.")
        answer: dict[str, Any] = {
            "documentsAnalysis": [{"attackDetected": self.attack_marker in d} for d in documents]
        }
        if prompt is not None:
            answer["userPromptAnalysis"] = {"attackDetected": self.attack_marker in prompt}
        return 200, answer

    def _analyze(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return 400, _error("InvalidRequestBody", "text is required.")
        text: str = body["text"]
        if len(text) > 10_000:
            return 400, _error("InvalidRequestBody", "text exceeds 10000 characters.")
        categories = body.get("categories") or list(CATEGORIES)
        if not set(categories) <= set(CATEGORIES):
            return 400, _error("InvalidRequestBody", "Unknown category.")
        found = {c: 0 for c in categories}
        for word, (category, severity) in self.severities.items():
            if word in text and category in found:
                found[category] = max(found[category], severity)
        return 200, {
            "blocklistsMatch": [],
            "categoriesAnalysis": [{"category": c, "severity": s} for c, s in found.items()],
        }

    # --- the server --------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                headers = {k.lower(): v for k, v in self.headers.items()}
                query = parse_qs(url.query)
                fake.requests.append(RecordedRequest(url.path, query, headers, body))
                if fake.delay_s:
                    fake._release.wait(fake.delay_s)
                status, answer = fake.answer(url.path, query, headers, body)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


@contextmanager
def running_content_safety(**options: Any) -> Iterator[FakeContentSafety]:
    fake = FakeContentSafety(**options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake._handler())
    server.daemon_threads = True
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake._release.set()  # let a delayed handler finish before shutting down
        server.shutdown()
        server.server_close()
