"""Where telemetry goes: the console, an OTLP collector over HTTP or gRPC, Azure Monitor.

Each exporter is built from settings by ``client_api.telemetry`` and fed by providers
built the same way, but kept local to the test (the process's global providers belong
to the session's in-memory capture). The receivers are real servers on loopback that
decode what arrives: OTLP protobuf, and Application Insights' track API.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from client_api.settings import TelemetrySettings
from client_api.telemetry import (
    SECONDS_BUCKETS,
    TOKEN_BUCKETS,
    TelemetryConfigurationError,
    build_exporters,
    build_meter_provider,
    build_tracer_provider,
    metric_views,
    trace_correlation_id,
)
from tests.client_api.corpus import ingest_corpus
from tests.support.processes import lamina_env, run_lamina

INSTRUMENTATION_KEY = "00000000-0000-4000-8000-0000000000a1"


def _record_a_span_and_a_metric(
    settings: TelemetrySettings, *, console: io.StringIO | None = None
) -> None:
    """Build the providers from ``settings``, record one span and one counter value
    through them, and flush both."""
    exporters = build_exporters(settings, console=console)
    tracers = build_tracer_provider(settings, exporters.spans)
    meters = build_meter_provider(settings, exporters.metrics)
    try:
        with tracers.get_tracer("lamina.tests").start_as_current_span("lamina.turn") as span:
            span.set_attribute("lamina.turn.status", "answered")
        meters.get_meter("lamina.tests").create_counter("lamina.tool.calls").add(
            2, {"gen_ai.tool.name": "lookup"}
        )
        assert tracers.force_flush()
        assert meters.force_flush()
    finally:
        tracers.shutdown()
        meters.shutdown()


# --- console ---------------------------------------------------------------------------


def test_the_console_exporters_write_spans_and_metrics_to_their_stream() -> None:
    out = io.StringIO()

    _record_a_span_and_a_metric(
        TelemetrySettings(exporters=["console"], service_name="lamina-console"), console=out
    )

    written = out.getvalue()
    assert '"name": "lamina.turn"' in written
    assert '"lamina.turn.status": "answered"' in written
    assert '"service.name": "lamina-console"' in written
    assert '"name": "lamina.tool.calls"' in written


# --- OTLP ------------------------------------------------------------------------------


@dataclass
class Collector:
    """What an OTLP collector on loopback received."""

    endpoint: str = ""
    paths: list[str] = field(default_factory=list)
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)

    def span_names(self) -> list[str]:
        return [
            span.name
            for request in self.traces
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def metric_names(self) -> list[str]:
        return [
            metric.name
            for request in self.metrics
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        ]

    def service_names(self) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.traces
            for resource in request.resource_spans
            for attribute in resource.resource.attributes
            if attribute.key == "service.name"
        }


@pytest.fixture
def otlp_http() -> Iterator[Collector]:
    """An OTLP/HTTP collector: protobuf bodies on /v1/traces and /v1/metrics."""
    collector = Collector()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            collector.paths.append(self.path)
            if self.path == "/v1/traces":
                collector.traces.append(
                    trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                )
            elif self.path == "/v1/metrics":
                collector.metrics.append(
                    metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                )
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with _serving(Receiver) as port:
        collector.endpoint = f"http://127.0.0.1:{port}"
        yield collector


def test_otlp_over_http_delivers_spans_and_metrics_to_the_collector(otlp_http: Collector) -> None:
    settings = TelemetrySettings(
        exporters=["otlp"], otlp_protocol="http/protobuf", otlp_endpoint=otlp_http.endpoint
    )

    _record_a_span_and_a_metric(settings)

    assert otlp_http.span_names() == ["lamina.turn"]
    assert otlp_http.service_names() == {"lamina"}
    assert "lamina.tool.calls" in otlp_http.metric_names()


def test_otlp_without_an_endpoint_follows_the_standard_variables(
    otlp_http: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_http.endpoint)

    _record_a_span_and_a_metric(TelemetrySettings(exporters=["otlp"]))

    assert otlp_http.span_names() == ["lamina.turn"]
    assert set(otlp_http.paths) == {"/v1/traces", "/v1/metrics"}


def test_otlp_over_grpc_delivers_spans_and_metrics_to_the_collector() -> None:
    collector = Collector()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            collector.traces.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            collector.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = TelemetrySettings(
            exporters=["otlp"], otlp_protocol="grpc", otlp_endpoint=f"http://127.0.0.1:{port}"
        )
        _record_a_span_and_a_metric(settings)
    finally:
        server.stop(grace=None)

    assert collector.span_names() == ["lamina.turn"]
    assert "lamina.tool.calls" in collector.metric_names()


def test_a_missing_otlp_exporter_names_the_setting_and_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes importing that module fail, as if not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)

    with pytest.raises(TelemetryConfigurationError) as raised:
        build_exporters(TelemetrySettings(exporters=["otlp"]))

    assert "LAMINA_TELEMETRY__EXPORTERS" in str(raised.value)
    assert "pip install 'lamina[otlp]'" in str(raised.value)


# --- Azure Monitor ---------------------------------------------------------------------


@pytest.fixture
def ingestion(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Application Insights' ingestion endpoint on loopback: its connection string, and
    the telemetry items posted to ``/v2.1/track``."""
    # The exporter's own reporting (statsbeat, remote configuration) goes to Microsoft's
    # endpoints, not the one in the connection string: not from a test.
    for variable in (
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL",
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED",
        "APPLICATIONINSIGHTS_SDKSTATS_DISABLED",
    ):
        monkeypatch.setenv(variable, "true")
    items: list[dict[str, Any]] = []

    class Track(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/v2.1/track":
                items.extend(json.loads(body))
            data = json.dumps({"itemsReceived": 1, "itemsAccepted": 1, "errors": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with _serving(Track) as port:
        connection_string = (
            f"InstrumentationKey={INSTRUMENTATION_KEY};IngestionEndpoint=http://127.0.0.1:{port}/"
        )
        yield connection_string, items


def test_azure_monitor_posts_spans_and_metrics_to_the_connection_strings_endpoint(
    ingestion: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    connection_string, items = ingestion
    settings = TelemetrySettings(
        exporters=["azure_monitor"], azure_monitor_connection_string=connection_string
    )

    _record_a_span_and_a_metric(settings)

    spans = [i for i in items if i["name"] == "Microsoft.ApplicationInsights.RemoteDependency"]
    assert [s["data"]["baseData"]["name"] for s in spans] == ["lamina.turn"]
    assert spans[0]["iKey"] == INSTRUMENTATION_KEY
    assert spans[0]["tags"]["ai.cloud.role"] == "lamina"
    metrics = [i for i in items if i["name"] == "Microsoft.ApplicationInsights.Metric"]
    assert "lamina.tool.calls" in [m["data"]["baseData"]["metrics"][0]["name"] for m in metrics]


def test_azure_monitor_takes_the_standard_variable_when_the_setting_is_empty(
    ingestion: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    connection_string, items = ingestion
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", connection_string)

    _record_a_span_and_a_metric(TelemetrySettings(exporters=["azure_monitor"]))

    assert "lamina.turn" in [i["data"]["baseData"].get("name") for i in items]


def test_azure_monitor_without_a_connection_string_names_both_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)

    with pytest.raises(TelemetryConfigurationError) as raised:
        build_exporters(TelemetrySettings(exporters=["azure_monitor"]))

    message = str(raised.value)
    assert "LAMINA_TELEMETRY__AZURE_MONITOR_CONNECTION_STRING" in message
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in message


def test_a_malformed_connection_string_is_refused_with_the_shape_expected() -> None:
    settings = TelemetrySettings(
        exporters=["azure_monitor"], azure_monitor_connection_string="IngestionEndpoint=x"
    )

    with pytest.raises(TelemetryConfigurationError) as raised:
        build_exporters(settings)

    assert "LAMINA_TELEMETRY__AZURE_MONITOR_CONNECTION_STRING" in str(raised.value)
    assert "InstrumentationKey=" in str(raised.value)


@pytest.mark.slow
def test_lamina_serve_refuses_to_start_with_an_exporter_that_cannot_work(tmp_path: Path) -> None:
    env = lamina_env(
        LAMINA_DATA_DIR=str(tmp_path),
        LAMINA_AUTH__MODE="dev",
        LAMINA_TELEMETRY__EXPORTERS='["azure_monitor"]',
        APPLICATIONINSIGHTS_CONNECTION_STRING="",
    )

    result = run_lamina("serve", "--port", "0", env=env, timeout_s=60)

    assert result.returncode == 2
    assert "LAMINA_TELEMETRY__AZURE_MONITOR_CONNECTION_STRING" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_lamina_ask_traces_its_turn_to_the_console(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data = ingest_corpus(
        tmp_path_factory,
        handbook="# Leave\n\nEvery employee gets 25 days of annual leave a year.\n",
        payroll="# Payroll\n\nPaid on the last day of the month.\n",
    )
    env = lamina_env(LAMINA_DATA_DIR=str(data), LAMINA_TELEMETRY__EXPORTERS='["console"]')

    result = run_lamina("ask", "How many days of annual leave do I get?", "--user", "ann", env=env)

    assert result.returncode == 0, result.stderr
    assert "25 days" in result.stdout
    assert '"name": "lamina.turn"' in result.stdout
    assert '"service.name": "lamina"' in result.stdout


# --- providers -------------------------------------------------------------------------


def test_latency_histograms_get_buckets_in_seconds_and_token_counts_in_tokens() -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader], views=metric_views())
    meter = meters.get_meter("lamina.tests")
    meter.create_histogram("lamina.turn.time_to_first_token", unit="s").record(0.3)
    meter.create_histogram("gen_ai.client.token.usage", unit="{token}").record(900)

    data = reader.get_metrics_data()
    assert data is not None
    bounds = {
        metric.name: tuple(point.explicit_bounds)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if isinstance(point, HistogramDataPoint)
    }
    assert bounds == {
        "lamina.turn.time_to_first_token": SECONDS_BUCKETS,
        "gen_ai.client.token.usage": tuple(float(b) for b in TOKEN_BUCKETS),
    }


def test_an_unsampled_request_still_has_its_trace_id_as_correlation_id() -> None:
    spans = InMemorySpanExporter()
    tracers = build_tracer_provider(TelemetrySettings(sample_ratio=0.0), [])
    tracers.add_span_processor(SimpleSpanProcessor(spans))

    with tracers.get_tracer("lamina.tests").start_as_current_span("GET /v1/chat") as span:
        correlation = trace_correlation_id()

    assert not span.is_recording()
    assert correlation == trace.format_trace_id(span.get_span_context().trace_id)
    assert spans.get_finished_spans() == ()


_RECORDING_PROBE = """
import io, json, sys
from opentelemetry import trace
from client_api.settings import TelemetrySettings
from client_api.telemetry import configure_telemetry, trace_correlation_id
configure_telemetry(TelemetrySettings(exporters=json.loads(sys.argv[1])))
with trace.get_tracer("probe").start_as_current_span("GET /v1/chat") as span:
    print(json.dumps([span.is_recording(), trace_correlation_id(),
                      trace.format_trace_id(span.get_span_context().trace_id)]))
"""


@pytest.mark.parametrize(("exporters", "recording"), [([], False), (["console"], True)])
def test_spans_are_recorded_only_when_an_exporter_receives_them(
    exporters: list[str], recording: bool
) -> None:
    # A fresh process: the providers configure_telemetry installs are process globals.
    probe = subprocess.run(
        [sys.executable, "-c", _RECORDING_PROBE, json.dumps(exporters)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    is_recording, correlation, trace_id = json.loads(probe.stdout.splitlines()[0])

    assert is_recording is recording
    assert correlation == trace_id != "0" * 32


def test_the_resource_names_the_service_and_its_version() -> None:
    tracers = build_tracer_provider(TelemetrySettings(service_name="lamina-eu"), [])

    attributes = tracers.resource.attributes
    assert attributes["service.name"] == "lamina-eu"
    assert attributes["service.version"] == metadata.version("lamina")


# --- helpers ---------------------------------------------------------------------------


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """A threading HTTP server on a free loopback port for the length of a block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
