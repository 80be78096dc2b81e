"""Requests when telemetry is on but nothing receives it (no exporter, the default).

The FastAPI instrumentation is then left out (its request attributes, route matching and
histograms would be for nobody), and :class:`~client_api.telemetry.ServerTraceContext`
only gives each request its trace: the correlation id must still be the id of the trace
the request's code runs in, a trusted caller's trace must still be continued and an
untrusted one's not, and the health probes stay untraced. Each case runs in a fresh
process, since the providers ``configure_telemetry`` installs are process globals.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from client_api.edge.telemetry import AdmissionCheck, admission_span

_PROBE = """
import json, sys
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from client_api.settings import TelemetrySettings
from client_api.telemetry import configure_telemetry

exporters, trusted, traceparent = json.loads(sys.argv[1])
telemetry = configure_telemetry(
    TelemetrySettings(exporters=exporters, trust_incoming_trace=trusted)
)
# As create_app builds it: FastAPI's own request telemetry off.
app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})

def seen() -> dict[str, object]:
    span = trace.get_current_span()
    context = span.get_span_context()
    return {"trace_id": trace.format_trace_id(context.trace_id) if context.is_valid else None,
            "recording": span.is_recording()}

@app.get("/v1/probe")
def probe() -> dict[str, object]:
    return seen()

@app.get("/healthz")
def health() -> dict[str, object]:
    return seen()

telemetry.add_correlation_ids(app, "X-Correlation-ID")
telemetry.instrument(app)
headers = {"traceparent": traceparent} if traceparent else {}
with TestClient(app) as client:
    answers = [client.get(path, headers=headers) for path in ("/v1/probe", "/healthz")]
# The console exporter writes to standard output too: the result is the marked line.
print("PROBE " + json.dumps({
    "received": telemetry.received,
    "instrumented": bool(getattr(app, "_is_instrumented_by_opentelemetry", False)),
    "answers": [{"correlation_id": a.headers["X-Correlation-ID"], **a.json()} for a in answers],
}), flush=True)
"""

CALLERS_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CALLERS_TRACE}-b7ad6b7169203331-01"


def _probe(exporters: list[str], *, trusted: bool = False, traceparent: str | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([exporters, trusted, traceparent])],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    marked = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    result: dict = json.loads(marked[0].removeprefix("PROBE "))
    return result


def test_without_an_exporter_the_instrumentation_is_left_out_but_ids_are_trace_ids() -> None:
    result = _probe([])
    request, health = result["answers"]

    assert result["received"] is False
    assert result["instrumented"] is False
    assert request["recording"] is False
    assert request["correlation_id"] == request["trace_id"] != "0" * 32
    # The probes run outside any trace: their ids are random.
    assert health["trace_id"] is None
    assert len(health["correlation_id"]) == 32


def test_with_an_exporter_the_app_is_instrumented_and_spans_recorded() -> None:
    result = _probe(["console"])
    request = result["answers"][0]

    assert result["received"] is True
    assert result["instrumented"] is True
    assert request["recording"] is True
    assert request["correlation_id"] == request["trace_id"]


@pytest.mark.parametrize(("trusted", "continued"), [(True, True), (False, False)])
def test_a_callers_trace_is_continued_only_when_trusted(trusted: bool, continued: bool) -> None:
    request = _probe([], trusted=trusted, traceparent=TRACEPARENT)["answers"][0]

    assert request["correlation_id"] == request["trace_id"]
    assert (request["trace_id"] == CALLERS_TRACE) is continued
    # Sampled by the caller or not, spans nobody receives are not recorded.
    assert request["recording"] is False


def test_an_edge_check_in_an_unsampled_trace_starts_no_span_and_still_raises() -> None:
    # Its children would follow the trace's decision: not recorded either.
    unsampled = NonRecordingSpan(
        SpanContext(trace_id=0xA1, span_id=0xB2, is_remote=False, trace_flags=TraceFlags(0))
    )
    checked = admission_span(AdmissionCheck.REQUESTS, lambda _: None)
    with trace.use_span(unsampled), pytest.raises(LookupError), checked as span:  # noqa: PT012
        assert not span.is_recording()
        assert trace.get_current_span() is unsampled
        raise LookupError
