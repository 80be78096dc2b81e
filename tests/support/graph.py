"""A fake Microsoft Graph on loopback: transitive group memberships, paged as Graph pages them.

``GET /v1.0/users/{id}/transitiveMemberOf/microsoft.graph.group?$select=id`` answers
``{"value": [{"id": ...}], "@odata.nextLink": ...}`` pages of ``page_size`` groups,
checks the bearer token, and records every request so tests can count them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GRAPH_TOKEN = "graph-token-for-tests"
_PREFIX = "/v1.0/users/"
_SUFFIX = "/transitiveMemberOf/microsoft.graph.group"


@dataclass(frozen=True)
class GraphRequest:
    path: str
    query: dict[str, list[str]]
    authorization: str | None


@dataclass
class FakeGraph:
    """Memberships by user id; ``status`` other than 200 makes every request fail with it."""

    base_url: str = ""
    memberships: dict[str, list[str]] = field(default_factory=dict)
    page_size: int = 2
    status: int = 200
    retry_after: str | None = None
    next_link_base: str | None = None
    """Where next links point; another server's URL to test that the token stays home."""
    requests: list[GraphRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if self.status != 200:
            return self.status, {"error": {"code": "serviceUnavailable", "message": "down"}}
        if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
            return 404, {"error": {"code": "Request_ResourceNotFound", "message": path}}
        user = unquote(path[len(_PREFIX) : -len(_SUFFIX)])
        if user not in self.memberships:
            return 404, {"error": {"code": "Request_ResourceNotFound", "message": user}}
        groups = self.memberships[user]
        start = int(query.get("$skiptoken", ["0"])[0])
        page: dict[str, Any] = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#directoryObjects",
            "value": [
                {"@odata.type": "#microsoft.graph.group", "id": g}
                for g in groups[start : start + self.page_size]
            ],
        }
        if start + self.page_size < len(groups):
            base = self.next_link_base or self.base_url
            page["@odata.nextLink"] = f"{base}{path}?$select=id&$skiptoken={start + self.page_size}"
        return 200, page

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        graph = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                with graph._lock:
                    graph.requests.append(
                        GraphRequest(parts.path, query, self.headers.get("Authorization"))
                    )
                if self.headers.get("Authorization") != f"Bearer {GRAPH_TOKEN}":
                    status, body = 401, {"error": {"code": "InvalidAuthenticationToken"}}
                else:
                    status, body = graph._answer(parts.path, query)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status != 200 and graph.retry_after is not None:
                    self.send_header("Retry-After", graph.retry_after)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@dataclass
class StaticGraphToken:
    """A ``GraphTokenProvider`` handing out one fixed token; records the tenants asked for."""

    token_value: str = GRAPH_TOKEN
    tenants: list[str] = field(default_factory=list)

    async def token(self, tenant_id: str) -> str:
        self.tenants.append(tenant_id)
        return self.token_value


@contextmanager
def running_graph(**memberships: list[str]) -> Iterator[FakeGraph]:
    graph = FakeGraph(memberships=dict(memberships))
    server = ThreadingHTTPServer(("127.0.0.1", 0), graph._handler())
    graph.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll interval: shutdown() waits for the serving loop to notice.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield graph
    finally:
        server.shutdown()
        server.server_close()
