"""Telemetry at the edge, over real HTTP: the correlation id is the trace id (header and
problem body) of a trace the request starts itself, whatever ``traceparent`` a caller
sends (unless trusted); the edge's own spans sit in the request's trace, refusals are
counted per route and reason, outgoing httpx calls are traced, and no user id or query
value reaches an HTTP span.

A real Lamina app on loopback (dev identity headers), a small corpus, the session's
in-memory span exporter and metric reader (``tests/support/telemetry.py``). The app's
telemetry set-up finds those providers installed and adds nothing to them.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from client_api.app import create_app
from client_api.edge.admission import admit_turn
from client_api.edge.caps import CapExceeded, RequestCaps
from client_api.edge.limits import InProcessLimitStore, RateLimited, RateLimiter
from client_api.problems import CORRELATION_HEADER, Problem, install_problem_handlers
from client_api.settings import LaminaSettings
from client_api.telemetry import configure_telemetry, scrub_url_attributes
from inferencing.contracts import TokenQuotaExceeded, TokenRateLimited
from inferencing.tokens import default_counter
from intelligence.contracts import AnswerFailed, Principal
from tests.client_api.corpus import dev_headers, dev_settings, ingest_corpus
from tests.support.graph import FakeGraph, StaticGraphToken, running_graph
from tests.support.identity import AUDIENCE, IdentityProvider, running_identity_provider
from tests.support.processes import app_in_thread
from tests.support.telemetry import MetricsProbe, children

HANDBOOK = "# Leave\n\nEvery employee gets 25 days of annual leave a year.\n"
PAYROLL = "# Payroll\n\nThe payroll account is held at Kestrel Bank.\n"
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_corpus(tmp_path_factory, handbook=HANDBOOK, payroll=PAYROLL)


@pytest.fixture(scope="module")
def lamina(corpus_data: Path) -> Iterator[str]:
    settings = dev_settings(
        corpus_data,
        caps={"max_body_bytes": 1024},
        limits={"tenants": {"tight": {"user_requests_per_minute": 1}}},
    )
    with app_in_thread(create_app(settings)) as base:
        yield base


# --- helpers ---------------------------------------------------------------------------


def _eventually(find: Callable[[], T | None], what: str) -> T:
    """What ``find`` returns once it returns something: a server span ends, and its
    metrics are recorded, just after the client has read the response."""
    deadline = time.monotonic() + 10
    while (found := find()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what}")
        time.sleep(0.01)
    return found


def _server_span(spans: InMemorySpanExporter, name: str, trace_id: str) -> ReadableSpan:
    def find() -> ReadableSpan | None:
        return next(
            (
                s
                for s in spans.get_finished_spans()
                if s.name == name and s.kind is SpanKind.SERVER and _trace_id(s) == trace_id
            ),
            None,
        )

    return _eventually(find, f"server span {name!r} in trace {trace_id}")


def _trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id)


def _in_trace(spans: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if _trace_id(s) == trace_id]


def _recorded(spans: list[ReadableSpan]) -> str:
    """Everything ``spans`` would export about themselves, as one string: attributes,
    event attributes (exception messages and stack traces) and the span names."""
    return json.dumps(
        [
            [s.name, dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events]]
            for s in spans
        ]
    )


def _counted(metrics: MetricsProbe, name: str, **attributes: Any) -> float:
    return _eventually(lambda: metrics.amount(name, **attributes) or None, f"{name} {attributes}")


def _raw_get(base: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """A GET through the standard library, which no instrumentation touches: the
    headers arrive exactly as given (httpx's instrumentation would write its own
    ``traceparent``)."""
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


# --- correlation id = trace id ---------------------------------------------------------


def test_a_401_carries_the_trace_id_in_its_header_and_body(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    response = httpx.get(f"{lamina}/v1/conversations", timeout=10)

    assert response.status_code == 401
    cid = response.headers[CORRELATION_HEADER]
    assert TRACE_ID.match(cid)
    assert response.json()["correlation_id"] == cid
    server = _server_span(spans, "GET /v1/conversations", cid)
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/conversations"
    assert server.attributes["http.response.status_code"] == 401
    (authenticate,) = children(server, _in_trace(spans, cid))
    assert authenticate.name == "lamina.authenticate"
    assert authenticate.attributes == {
        "lamina.auth.method": "dev",
        "lamina.auth.outcome": "refused",
        "lamina.policy.reason": "unauthenticated",
    }


def test_a_422_for_a_malformed_body_carries_the_trace_id(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    response = httpx.post(
        f"{lamina}/v1/chat",
        content=b"{not json",
        headers={**dev_headers("ann"), "Content-Type": "application/json"},
        timeout=10,
    )

    assert response.status_code == 422
    cid = response.headers[CORRELATION_HEADER]
    assert response.json()["correlation_id"] == cid
    _server_span(spans, "POST /v1/chat", cid)


def test_the_edge_spans_of_an_admitted_request_are_children_of_its_server_span(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    response = httpx.get(
        f"{lamina}/v1/conversations", headers=dev_headers("ann", tenant="fabrikam"), timeout=10
    )

    assert response.status_code == 200
    cid = response.headers[CORRELATION_HEADER]
    server = _server_span(spans, "GET /v1/conversations", cid)
    edge = {s.name: s for s in children(server, _in_trace(spans, cid))}
    assert edge["lamina.authenticate"].attributes == {
        "lamina.auth.method": "dev",
        "lamina.tenant.id": "fabrikam",
        "lamina.auth.outcome": "authenticated",
    }
    assert edge["lamina.admission"].attributes == {
        "lamina.policy.check": "requests_per_minute",
        "lamina.policy.outcome": "admitted",
    }


def test_a_chat_turn_passes_caps_and_token_admission_in_its_trace(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    response = httpx.post(
        f"{lamina}/v1/chat",
        json={"message": "How many days of annual leave do I get?"},
        headers=dev_headers("ann"),
        timeout=30,
    )

    assert response.status_code == 200
    cid = response.headers[CORRELATION_HEADER]
    server = _server_span(spans, "POST /v1/chat", cid)
    checks = [
        s.attributes["lamina.policy.check"]
        for s in children(server, _in_trace(spans, cid))
        if s.name == "lamina.admission" and s.attributes is not None
    ]
    assert sorted(checks) == ["caps", "requests_per_minute", "tokens"]  # type: ignore[type-var]


def test_a_streamed_answer_sends_the_trace_id_before_its_body(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    with httpx.stream(
        "POST",
        f"{lamina}/v1/chat/stream",
        json={"message": "How many days of annual leave do I get?"},
        headers=dev_headers("ann"),
        timeout=30,
    ) as response:
        assert response.status_code == 200
        cid = response.headers[CORRELATION_HEADER]
        events = [line for line in response.iter_lines() if line.startswith("event:")]

    assert "event: done" in events
    _server_span(spans, "POST /v1/chat/stream", cid)


def test_a_callers_traceparent_starts_a_new_trace_that_only_links_to_the_callers(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    # Someone else's trace id (as seen in an error body), marked "not sampled".
    forged_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, headers = _raw_get(
        lamina,
        "/v1/conversations",
        {
            **dev_headers("ann"),
            "traceparent": f"00-{forged_trace}-00f067aa0ba902b7-00",
            CORRELATION_HEADER: forged_trace,
        },
    )

    assert status == 200
    cid = headers[CORRELATION_HEADER.lower()]
    assert TRACE_ID.match(cid)
    assert cid != forged_trace
    # Recorded by Lamina's own sampling decision, as the root of a trace of its own.
    server = _server_span(spans, "GET /v1/conversations", cid)
    assert server.parent is None
    (link,) = server.links
    assert trace.format_trace_id(link.context.trace_id) == forged_trace
    assert link.context.span_id == 0x00F067AA0BA902B7
    assert forged_trace not in {_trace_id(s) for s in spans.get_finished_spans()}


def test_behind_a_trusted_gateway_a_callers_traceparent_continues_its_trace(
    corpus_data: Path, spans: InMemorySpanExporter
) -> None:
    settings = dev_settings(corpus_data, telemetry={"trust_incoming_trace": True})
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with app_in_thread(create_app(settings)) as base:
        status, headers = _raw_get(
            base,
            "/v1/conversations",
            {
                **dev_headers("ann"),
                "traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01",
                CORRELATION_HEADER: "9b2c0a59e0f84f6c9f4c2d8f1a0e7b31",
            },
        )

    assert status == 200
    # The caller's trace id, not the correlation id it presented.
    assert headers[CORRELATION_HEADER.lower()] == caller_trace
    server = _server_span(spans, "GET /v1/conversations", caller_trace)
    assert server.parent is not None
    assert server.parent.span_id == 0x00F067AA0BA902B7
    assert not server.links


def test_health_probes_are_not_traced_and_get_a_random_correlation_id(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    first = httpx.get(f"{lamina}/healthz", timeout=10)
    second = httpx.get(f"{lamina}/healthz", timeout=10)

    ids = [r.headers[CORRELATION_HEADER] for r in (first, second)]
    assert all(TRACE_ID.match(i) for i in ids)
    assert ids[0] != ids[1]
    assert not [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]


# --- refusals --------------------------------------------------------------------------


def test_refusals_are_counted_by_reason_and_route_without_the_user(
    lamina: str, spans: InMemorySpanExporter, metrics: MetricsProbe
) -> None:
    unauthenticated = httpx.get(f"{lamina}/v1/conversations", timeout=10)
    tight = dev_headers("rita", tenant="tight")
    admitted = httpx.get(f"{lamina}/v1/conversations", headers=tight, timeout=10)
    limited = httpx.get(f"{lamina}/v1/conversations", headers=tight, timeout=10)

    assert [r.status_code for r in (unauthenticated, admitted, limited)] == [401, 200, 429]
    route = {"http.route": "/v1/conversations"}
    assert _counted(metrics, "lamina.edge.refusals", **route, **_reason("unauthenticated")) == 1
    assert _counted(metrics, "lamina.edge.refusals", **route, **_reason("rate_limited")) == 1
    for attributes in metrics.attribute_sets("lamina.edge.refusals"):
        assert set(attributes) == {"lamina.policy.reason", "http.route"}
    # The refusing check says why in the request's trace.
    cid = limited.headers[CORRELATION_HEADER]
    server = _server_span(spans, "GET /v1/conversations", cid)
    (admission,) = [
        s for s in children(server, _in_trace(spans, cid)) if s.name == "lamina.admission"
    ]
    assert admission.attributes is not None
    assert admission.attributes["lamina.policy.outcome"] == "refused"
    assert admission.attributes["lamina.policy.reason"] == "rate_limited"
    assert admission.status.is_ok


def test_a_body_over_the_cap_is_counted_too_large_and_its_problem_has_the_trace_id(
    lamina: str, metrics: MetricsProbe
) -> None:
    response = httpx.post(
        f"{lamina}/v1/chat",
        json={"message": "x" * 2000},
        headers=dev_headers("ann"),
        timeout=10,
    )

    assert response.status_code == 413
    assert response.json()["correlation_id"] == response.headers[CORRELATION_HEADER]
    too_large = {"lamina.policy.reason": "too_large", "http.route": "/v1/chat"}
    assert _counted(metrics, "lamina.edge.refusals", **too_large) == 1


def test_a_presented_api_key_never_reaches_a_span(lamina: str, spans: InMemorySpanExporter) -> None:
    key = "lam_notarealkey0123456789abcdef"
    response = httpx.get(
        f"{lamina}/v1/conversations", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )

    assert response.status_code == 401
    cid = response.headers[CORRELATION_HEADER]
    _server_span(spans, "GET /v1/conversations", cid)
    (authenticate,) = [s for s in _in_trace(spans, cid) if s.name == "lamina.authenticate"]
    assert authenticate.attributes is not None
    assert authenticate.attributes["lamina.auth.method"] == "api_key"
    everything = json.dumps([dict(s.attributes or {}) for s in _in_trace(spans, cid)])
    assert "notarealkey" not in everything


async def test_a_teams_turn_refused_at_the_edge_is_counted_under_the_bot_route(
    metrics: MetricsProbe, spans: InMemorySpanExporter
) -> None:
    settings = LaminaSettings(limits={"user_requests_per_minute": 1})
    limiter = RateLimiter(InProcessLimitStore(), settings.limits)
    caps = RequestCaps(settings.caps, default_counter())
    principal = Principal(tenant_id="contoso", user_id="tess", auth_method="teams")

    await admit_turn(limiter, caps, principal, "First question")
    with pytest.raises(RateLimited):
        await admit_turn(limiter, caps, principal, "Second question")

    refused = {"lamina.policy.reason": "rate_limited", "http.route": "/api/messages"}
    assert metrics.amount("lamina.edge.refusals", **refused) == 1
    outcomes = [
        (s.attributes or {}).get("lamina.policy.outcome")
        for s in spans.get_finished_spans()
        if s.name == "lamina.admission"
    ]
    assert outcomes == ["admitted", "admitted", "admitted", "refused"]


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (TokenQuotaExceeded("The daily quota is used up."), "quota_exceeded"),
        (TokenRateLimited("Too many tokens this minute.", retryable=True), "rate_limited"),
        (TokenRateLimited("More tokens than a minute allows."), "too_large"),
        (CapExceeded(422, "max_output_tokens", "Too many output tokens."), "too_large"),
        (Problem(403, "Forbidden", "Missing permission"), "forbidden"),
        # The gateway ran out in the middle of a turn the edge had admitted: its own count.
        (AnswerFailed("The quota ran out.", code="quota_exceeded"), None),
        (AnswerFailed("Too many tokens.", code="rate_limited"), None),
        (Problem(404, "Not found"), None),
    ],
)
async def test_which_problems_count_as_edge_refusals(
    cause: Exception, reason: str | None, metrics: MetricsProbe
) -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/fails/{case}")
    async def fails(case: str) -> None:
        raise cause

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://lamina") as client:
        response = await client.get("/fails/one")

    assert response.status_code >= 400
    counted = {
        attributes["lamina.policy.reason"]
        for attributes in metrics.attribute_sets("lamina.edge.refusals")
        if attributes["http.route"] == "/fails/{case}"
        and metrics.amount("lamina.edge.refusals", **attributes)
    }
    assert counted == ({reason} if reason else set())


def _reason(reason: str) -> dict[str, str]:
    return {"lamina.policy.reason": reason}


# --- request metrics ------------------------------------------------------------------


def test_request_latency_is_recorded_per_route(lamina: str, metrics: MetricsProbe) -> None:
    for _ in range(2):
        response = httpx.get(f"{lamina}/v1/conversations", headers=dev_headers("ann"), timeout=10)
        assert response.status_code == 200

    per_route = {"http.route": "/v1/conversations", "http.response.status_code": 200}
    assert _counted(metrics, "http.server.request.duration", **per_route) == 2


# --- outgoing calls ------------------------------------------------------------------


def test_the_key_fetch_of_a_sign_in_is_a_client_span_under_authentication(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with running_identity_provider() as idp:
        token = idp.token("ann")
        settings = LaminaSettings(
            data_dir=tmp_path,
            log_level="WARNING",
            auth={"mode": "jwt", "openid_config_url": idp.config_url, "audience": AUDIENCE},
        )
        with app_in_thread(create_app(settings)) as base:
            response = httpx.get(
                f"{base}/v1/conversations", headers={"Authorization": f"Bearer {token}"}, timeout=10
            )

    assert response.status_code == 200
    cid = response.headers[CORRELATION_HEADER]
    _server_span(spans, "GET /v1/conversations", cid)
    in_trace = _in_trace(spans, cid)
    (authenticate,) = [s for s in in_trace if s.name == "lamina.authenticate"]
    assert authenticate.attributes is not None
    assert authenticate.attributes["lamina.auth.method"] == "jwt"
    fetched = {
        str((s.attributes or {})["url.full"]): (s.attributes or {}).get("http.response.status_code")
        for s in children(authenticate, in_trace)
        if s.kind is SpanKind.CLIENT
    }
    assert fetched == {idp.config_url: 200, f"{idp.base_url}/keys": 200}
    everything = json.dumps([dict(s.attributes or {}) for s in in_trace])
    assert token not in everything
    assert token.split(".")[2] not in everything


# --- no user ids, no query values ---------------------------------------------------

# A user id that a span must not carry: Graph is asked for this user's groups.
MEGAN = "megan.bowen@contoso.com"


def test_the_server_span_keeps_query_names_but_not_their_values(
    lamina: str, spans: InMemorySpanExporter
) -> None:
    response = httpx.get(
        f"{lamina}/v1/audit",
        params={"user_id": MEGAN, "limit": 5},
        headers=dev_headers("ann"),
        timeout=10,
    )

    cid = response.headers[CORRELATION_HEADER]
    server = _server_span(spans, "GET /v1/audit", cid)
    assert server.attributes is not None
    assert server.attributes["url.path"] == "/v1/audit"
    assert server.attributes["url.query"] == "user_id=REDACTED&limit=REDACTED"
    assert "megan" not in _recorded(_in_trace(spans, cid))


@contextmanager
def _signed_in_lamina(data: Path, idp: IdentityProvider, graph: FakeGraph) -> Iterator[str]:
    """A Lamina app with real sign-in that reads overflowing groups from ``graph``."""
    settings = LaminaSettings(
        data_dir=data,
        log_level="WARNING",
        auth={
            "mode": "jwt",
            "openid_config_url": idp.config_url,
            "audience": AUDIENCE,
            "graph_base_url": graph.base_url,
        },
    )
    with app_in_thread(create_app(settings, graph_token=StaticGraphToken())) as base:
        yield base


def test_graph_group_lookups_are_traced_without_the_user_id_or_query_values(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with (
        running_identity_provider() as idp,
        running_graph(**{MEGAN: ["g-1", "g-2", "g-3"]}) as graph,
        _signed_in_lamina(tmp_path, idp, graph) as base,
    ):
        # Too many groups for the token: Lamina asks Graph, two pages of two.
        token = idp.token(MEGAN, omit=("groups",), extra={"hasgroups": True})
        response = httpx.get(
            f"{base}/v1/conversations", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    assert response.status_code == 200
    assert [r.path.split("/")[3] for r in graph.requests] == ["megan.bowen%40contoso.com"] * 2
    cid = response.headers[CORRELATION_HEADER]
    _server_span(spans, "GET /v1/conversations", cid)
    in_trace = _in_trace(spans, cid)
    lookups = sorted(
        str(url)
        for s in in_trace
        if s.kind is SpanKind.CLIENT
        and str(url := (s.attributes or {})["url.full"]).startswith(graph.base_url)
    )
    groups = f"{graph.base_url}/v1.0/users/{{id}}/transitiveMemberOf/microsoft.graph.group"
    assert lookups == [
        f"{groups}?$select=REDACTED&$skiptoken=REDACTED",
        f"{groups}?$select=REDACTED&$top=REDACTED",
    ]
    assert "megan" not in _recorded(in_trace)


def test_a_failed_graph_lookup_is_recorded_without_the_user_id(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with (
        running_identity_provider() as idp,
        running_graph(**{MEGAN: ["g-1"]}) as graph,
        _signed_in_lamina(tmp_path, idp, graph) as base,
    ):
        graph.status = 503
        token = idp.token(MEGAN, omit=("groups",), extra={"hasgroups": True})
        response = httpx.get(
            f"{base}/v1/conversations", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    assert response.status_code == 503
    cid = response.headers[CORRELATION_HEADER]
    _server_span(spans, "GET /v1/conversations", cid)
    in_trace = _in_trace(spans, cid)
    (authenticate,) = [s for s in in_trace if s.name == "lamina.authenticate"]
    assert authenticate.attributes is not None
    assert authenticate.attributes["lamina.auth.outcome"] == "failed"
    (error,) = authenticate.events
    assert error.attributes is not None
    assert error.attributes["exception.message"] == "Graph answered 503 to a group look-up"
    assert "megan" not in _recorded(in_trace)


def test_the_older_http_conventions_url_attributes_are_scrubbed_too() -> None:
    # Recorded besides the stable ones with OTEL_SEMCONV_STABILITY_OPT_IN=http/dup, which
    # the instrumentations read once per process: checked on a span of a local provider.
    exported = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exported))
    with tracers.get_tracer("lamina.tests").start_as_current_span(
        "GET",
        attributes={
            "http.url": "https://graph.example/v1.0/Users/megan/memberOf?$top=9#megan",
            "http.target": "/v1/audit?user_id=megan&verbose",
            "http.method": "GET",
        },
    ) as span:
        scrub_url_attributes(span)

    (recorded,) = exported.get_finished_spans()
    assert recorded.attributes == {
        "http.url": "https://graph.example/v1.0/Users/{id}/memberOf?$top=REDACTED",
        "http.target": "/v1/audit?user_id=REDACTED&REDACTED",
        "http.method": "GET",
    }


# --- telemetry off -------------------------------------------------------------------


def test_with_telemetry_off_the_app_is_not_instrumented_and_the_id_is_random(
    corpus_data: Path, spans: InMemorySpanExporter
) -> None:
    settings = dev_settings(corpus_data, telemetry={"enabled": False})
    presented = "9b2c0a59-e0f8-4f6c-9f4c-2d8f1a0e7b31"
    with app_in_thread(create_app(settings)) as base:
        _, fresh = _raw_get(base, "/v1/conversations", dev_headers("ann"))
        _, kept = _raw_get(
            base, "/v1/conversations", {**dev_headers("ann"), CORRELATION_HEADER: presented}
        )

    cid = fresh[CORRELATION_HEADER.lower()]
    assert TRACE_ID.match(cid)
    assert kept[CORRELATION_HEADER.lower()] == presented
    # (This process has providers, set up by the tests: FastAPI's own telemetry, where
    # the FastAPI version has one, still traces. Lamina adds nothing, and ids are not
    # trace ids.)
    assert not [
        s
        for s in spans.get_finished_spans()
        if s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "opentelemetry.instrumentation.fastapi"
    ]
    assert cid not in {_trace_id(s) for s in spans.get_finished_spans()}


def test_configuring_again_reuses_the_installed_providers() -> None:
    tracers = trace.get_tracer_provider()

    telemetry = configure_telemetry(LaminaSettings().telemetry)

    assert telemetry.enabled
    assert trace.get_tracer_provider() is tracers
    # Not installed by Lamina: not Lamina's to flush.
    assert telemetry.tracer_provider is None
    assert telemetry.meter_provider is None
