"""OpenTelemetry for the process: SDK providers, exporters, FastAPI and httpx
instrumentation, and correlation ids taken from the trace.

Every layer records through the OpenTelemetry API (``<layer>/telemetry.py``); this is the
only module that imports the SDK and the exporters. :func:`configure_telemetry` installs
a tracer and a meter provider as the process's globals, and the API's proxies bind to
them. Global providers can be set once per process, so when an SDK provider is already
installed (by a second app in the same process, by the tests, or by
``opentelemetry-instrument``) it is used as it is and nothing is added to it twice.

The correlation id of a request is its trace id (32 hex characters): returned in
``X-Correlation-ID``, in every problem body, and stored with audit records, so that one
value finds the request's trace in any backend. The API is a public edge, so a caller's
W3C trace context is not trusted: every request starts its own trace (linked to the
caller's), otherwise anyone could reuse someone else's correlation id, mixing two users'
audit records under one id, or decide whether their requests are sampled. Behind a
trusted gateway ``trust_incoming_trace`` lets callers continue their traces. An
``X-Correlation-ID`` a caller sends is never taken over, since that would make the id
disagree with the trace. With telemetry off there is no trace, and correlation ids are
random (or the caller's, when it sends a UUID).

The URLs of HTTP spans, incoming and outgoing, lose their query values and the id in a
``/users/{id}`` path (Microsoft Graph's group look-ups), whatever ``capture_content``
says: query strings can carry anything, and user ids stay out of telemetry
(:func:`scrub_url_attributes`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TextIO, cast
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4
from weakref import WeakSet

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.instrumentation.asgi import asgi_getter
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor, RequestInfo
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanContext
from starlette.types import ASGIApp, Receive, Scope, Send

from client_api.settings import SettingsError, TelemetrySettings, env_name

log = logging.getLogger(__name__)

HEALTH_ROUTES = ("/healthz", "/readyz")
"""Probed every few seconds by the platform: not traced."""

AZURE_MONITOR_CONNECTION_STRING_ENV = "APPLICATIONINSIGHTS_CONNECTION_STRING"
_SEMCONV_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
_FLUSH_TIMEOUT_MS = 5_000

# Histogram buckets. The SDK's default buckets (0 … 10,000) suit milliseconds; ours are
# seconds, tokens and ratios.
SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0,
)  # fmt: skip
"""Request, turn and model-call durations: from a cached answer to a long streamed one."""
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
"""The OpenTelemetry GenAI conventions' buckets for ``gen_ai.client.token.usage``."""
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Scores between 0 and 1 (unit ``1``), such as retrieval scores."""


class TelemetryConfigurationError(SettingsError):
    """The telemetry settings cannot work (an exporter not installed, no connection
    string); the message names the setting and the fix."""


@dataclass(frozen=True)
class Exporters:
    """Where spans and metrics go, built from ``LAMINA_TELEMETRY__EXPORTERS``."""

    spans: list[SpanExporter] = field(default_factory=list)
    metrics: list[MetricExporter] = field(default_factory=list)


@dataclass(frozen=True)
class Telemetry:
    """Telemetry as configured for this process, and what an app needs from it."""

    enabled: bool
    tracer_provider: TracerProvider | None = None
    """The provider :func:`configure_telemetry` installed, if it installed one."""
    meter_provider: MeterProvider | None = None
    trust_incoming_trace: bool = False
    """Let a caller's ``traceparent`` parent the server span (behind a trusted gateway)."""
    received: bool = True
    """Whether anything receives the process's spans or metrics: an exporter, or providers
    installed by someone else (who may have readers Lamina cannot see)."""

    def instrument(self, app: FastAPI) -> None:
        """Server spans and ``http.server.request.duration`` (per ``http.route``) for
        ``app``. The health probes are left out; so are the per-message ``send`` and
        ``receive`` spans, which would add one span per streamed chunk. Unless
        ``trust_incoming_trace``, each request starts a trace of its own
        (:class:`IgnoreIncomingTraceContext`).

        When nothing receives them (``received`` off), no span attribute or metric is
        worth collecting: :class:`ServerTraceContext` stands in for the instrumentation,
        and each request only gets its trace id."""
        if not self.enabled:
            return
        if not self.received:
            _wrap_middleware_stack(app, ServerTraceContext)
        else:
            self._instrument_fully(app)
        if not self.trust_incoming_trace:
            _wrap_middleware_stack(app, IgnoreIncomingTraceContext)

    def _instrument_fully(self, app: FastAPI) -> None:
        FastAPIInstrumentor.instrument_app(
            app,
            server_request_hook=_server_request_hook,
            excluded_urls=",".join(f"{route}$" for route in HEALTH_ROUTES),
            exclude_spans=["receive", "send"],
        )

    def add_correlation_ids(self, app: FastAPI, header: str) -> None:
        """Give every request a correlation id, returned in ``header``: the trace id of
        its server span when telemetry is on (the instrumentation wraps every user
        middleware, so that span is current here); a random id otherwise."""
        if not self.enabled:
            app.add_middleware(
                CorrelationIdMiddleware, header_name=header, update_request_header=False
            )
            return
        app.add_middleware(
            CorrelationIdMiddleware,
            header_name=header,
            update_request_header=False,
            generator=trace_correlation_id,
            # Whatever the caller sent, the id is the trace's.
            validator=None,
            transformer=_trace_id_over_presented,
        )

    def flush(self) -> None:
        """Export what is buffered now (at shutdown; the providers also flush at exit).
        Blocks up to a few seconds per provider."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(_FLUSH_TIMEOUT_MS)
        if self.meter_provider is not None:
            self.meter_provider.force_flush(_FLUSH_TIMEOUT_MS)


def trace_correlation_id() -> str:
    """The current trace's id as 32 lower-case hex characters; a random id of the same
    shape outside any trace (an untraced health probe, telemetry off)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return trace.format_trace_id(context.trace_id)
    return uuid4().hex


def _trace_id_over_presented(_presented: str) -> str:
    return trace_correlation_id()


# --- what the HTTP instrumentations may record ------------------------------------------

INCOMING_TRACE_SCOPE_KEY = "lamina.incoming_trace"
"""ASGI scope key of the span context a caller sent, when it was not trusted."""


class IgnoreIncomingTraceContext:
    """ASGI wrapper, outside the instrumentation, that hides a caller's trace context
    from it: the headers the global propagator reads (``traceparent``, ``tracestate``
    and ``baggage`` by default) are removed, so the server span starts a new trace,
    sampled by Lamina's own ratio, and the caller's baggage is not forwarded by outgoing
    calls. The caller's span context is left in the scope under
    :data:`INCOMING_TRACE_SCOPE_KEY`, and the server span links to it: a public endpoint,
    as the HTTP conventions advise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            fields = _propagated_headers()
            kept: list[tuple[bytes, bytes]] = []
            presented: dict[str, str] = {}
            for name, value in scope["headers"]:
                # ASGI header names are lower-case bytes.
                if name in fields:
                    presented[name.decode("latin-1")] = value.decode("latin-1")
                else:
                    kept.append((name, value))
            if presented:
                scope = {**scope, "headers": kept}
                incoming = trace.get_current_span(propagate.extract(presented))
                if incoming.get_span_context().is_valid:
                    scope[INCOMING_TRACE_SCOPE_KEY] = incoming.get_span_context()
        await self.app(scope, receive, send)


class ServerTraceContext:
    """ASGI wrapper standing in for the FastAPI instrumentation when nothing receives
    spans or metrics: each request (but the health probes) runs in a server span
    started as the instrumentation starts it, from the caller's propagated context when
    one is presented, so that its trace id, the correlation id, is the one the
    instrumentation would give. The span is not recorded (no exporter), so the work the
    instrumentation does for it (request attributes, the route matched again for the
    span name, the duration histograms) is skipped: a large share of a passthrough's
    CPU, for figures nobody would read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._tracer = trace.get_tracer(__name__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].endswith(HEALTH_ROUTES):
            await self.app(scope, receive, send)
            return
        parent = otel_context.get_current()
        if trace.get_current_span(parent) is trace.INVALID_SPAN and _presents_context(scope):
            parent = propagate.extract(cast(dict[str, Any], scope), getter=asgi_getter)
        span = self._tracer.start_span(
            scope.get("method") or "WS", context=parent, kind=trace.SpanKind.SERVER
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)
            span.end()


def _presents_context(scope: Scope) -> bool:
    """Whether the request carries a header the global propagator reads."""
    fields = _propagated_headers()
    return any(name in fields for name, _ in scope["headers"])


_propagated: tuple[object, frozenset[bytes]] = (None, frozenset())


def _propagated_headers() -> frozenset[bytes]:
    """The header names the global propagator reads, lower-case ASGI bytes; worked out
    again only when another propagator is installed (a composite one builds the set
    anew on every look-up)."""
    global _propagated
    textmap = propagate.get_global_textmap()
    if _propagated[0] is not textmap:
        names = frozenset(name.lower().encode("latin-1") for name in textmap.fields)
        _propagated = (textmap, names)
    return _propagated[1]


def _wrap_middleware_stack(app: FastAPI, wrapper: Callable[[ASGIApp], ASGIApp]) -> None:
    """Put ``wrapper`` around ``app``'s whole middleware stack, outside the FastAPI
    instrumentation's middleware (which wraps the stack this same way; a middleware added
    with ``add_middleware`` would run inside it, after the trace has begun)."""
    build = app.build_middleware_stack

    def build_wrapped() -> ASGIApp:
        return wrapper(build())

    app.build_middleware_stack = build_wrapped  # type: ignore[method-assign]


def _server_request_hook(span: Span, scope: dict[str, Any]) -> None:
    scrub_url_attributes(span)
    incoming = scope.get(INCOMING_TRACE_SCOPE_KEY)
    if isinstance(incoming, SpanContext):
        span.add_link(incoming)


def _client_request_hook(span: Span, _request: RequestInfo) -> None:
    scrub_url_attributes(span)


async def _async_client_request_hook(span: Span, _request: RequestInfo) -> None:
    scrub_url_attributes(span)


REDACTED = "REDACTED"
"""What replaces a query value; the same marker the instrumentations put in place of
credentials in a URL."""
_USER_ID_SEGMENT = re.compile(r"(/users/)[^/]+", re.IGNORECASE)


def _scrub_path(path: str) -> str:
    """``path`` with the segment after ``/users/`` replaced by ``{id}``."""
    return _USER_ID_SEGMENT.sub(r"\1{id}", path)


def _redact_query(query: str) -> str:
    """``query`` with every value replaced by ``REDACTED``; the names are kept."""
    return "&".join(
        f"{name}={REDACTED}" if has_value else REDACTED
        for name, has_value, _ in (part.partition("=") for part in query.split("&") if part)
    )


def _scrub_url(url: str) -> str:
    """A URL or request target (``/path?query``) through :func:`_scrub_path` and
    :func:`_redact_query`, without its fragment."""
    parts = urlsplit(url)
    return urlunsplit(
        (parts.scheme, parts.netloc, _scrub_path(parts.path), _redact_query(parts.query), "")
    )


_URL_ATTRIBUTES: dict[str, Callable[[str], str]] = {
    "url.full": _scrub_url,
    "url.path": _scrub_path,
    "url.query": _redact_query,
    # The older HTTP conventions, recorded too with OTEL_SEMCONV_STABILITY_OPT_IN=http/dup.
    "http.url": _scrub_url,
    "http.target": _scrub_url,
}


def scrub_url_attributes(span: Span) -> None:
    """Rewrite the URL attributes an HTTP instrumentation has just set on ``span``: a
    query (``GET /v1/audit?user_id=...``) keeps its names but not its values, and a
    ``/users/{id}`` path (Microsoft Graph's ``/v1.0/users/{id}/transitiveMemberOf``)
    loses the id. Called from the instrumentations' request hooks, which run right after
    the span starts, so what is exported is the scrubbed value; a span processor would
    not reach providers Lamina did not install."""
    if not isinstance(span, SdkSpan) or not span.is_recording():
        return
    recorded = span.attributes or {}
    for key, scrub in _URL_ATTRIBUTES.items():
        value = recorded.get(key)
        if isinstance(value, str):
            span.set_attribute(key, scrub(value))


def configure_telemetry(settings: TelemetrySettings) -> Telemetry:
    """Install SDK providers with the configured exporters as the process's globals
    (unless SDK providers are installed already), and instrument httpx clients.

    With ``enabled`` off nothing is installed: the API's spans and instruments stay
    no-ops. Raises :class:`TelemetryConfigurationError` when an exporter cannot work."""
    if not settings.enabled:
        return Telemetry(enabled=False)
    tracers, meters = trace.get_tracer_provider(), metrics.get_meter_provider()
    lacks_tracers = not isinstance(tracers, TracerProvider)
    lacks_meters = not isinstance(meters, MeterProvider)
    if lacks_tracers or lacks_meters:
        exporters = build_exporters(settings)
        if lacks_tracers:
            # Spans nobody receives are not recorded (a third of a passthrough's CPU);
            # their trace ids are still minted, so correlation ids keep working.
            tracer_provider = build_tracer_provider(
                settings, exporters.spans, record=bool(exporters.spans)
            )
            trace.set_tracer_provider(tracer_provider)
            _installed_if_global(tracer_provider, trace.get_tracer_provider(), exporters.spans)
        if lacks_meters:
            meter_provider = build_meter_provider(settings, exporters.metrics)
            metrics.set_meter_provider(meter_provider)
            _installed_if_global(meter_provider, metrics.get_meter_provider(), exporters.metrics)
    elif settings.exporters and tracers not in _INSTALLED:
        log.info(
            "telemetry: using the tracer and meter providers already installed in this "
            "process; %s adds no exporter to them",
            env_name(("telemetry", "exporters")),
        )
    _prefer_stable_http_conventions()
    httpx_instrumentor = HTTPXClientInstrumentor()
    if not httpx_instrumentor.is_instrumented_by_opentelemetry:
        httpx_instrumentor.instrument(
            request_hook=_client_request_hook, async_request_hook=_async_client_request_hook
        )
    tracers, meters = trace.get_tracer_provider(), metrics.get_meter_provider()
    return Telemetry(
        enabled=True,
        trust_incoming_trace=settings.trust_incoming_trace,
        tracer_provider=tracers
        if isinstance(tracers, TracerProvider) and tracers in _INSTALLED
        else None,
        meter_provider=meters
        if isinstance(meters, MeterProvider) and meters in _INSTALLED
        else None,
        received=not (tracers in _UNRECEIVED and meters in _UNRECEIVED),
    )


_INSTALLED: WeakSet[object] = WeakSet()
"""The providers this module made global: a later app in the process flushes them too,
and adds nothing to them."""
_UNRECEIVED: WeakSet[object] = WeakSet()
"""Those of :data:`_INSTALLED` that were given no exporter: what they hold goes nowhere."""


def _installed_if_global(provider: object, current: object, exporters: Sequence[object]) -> None:
    # Setting a global provider a second time is refused (with a warning) by the API.
    if current is provider:
        _INSTALLED.add(provider)
        if not exporters:
            _UNRECEIVED.add(provider)


def _prefer_stable_http_conventions() -> None:
    """Ask the HTTP instrumentations for the stable conventions: without the opt-in they
    record ``http.server.duration`` in milliseconds instead of
    ``http.server.request.duration`` in seconds. They read the variable once, when the
    first of them is set up, so this runs before any is."""
    chosen = [m.strip() for m in os.environ.get(_SEMCONV_OPT_IN, "").split(",") if m.strip()]
    if not {"http", "http/dup"} & set(chosen):
        os.environ[_SEMCONV_OPT_IN] = ",".join([*chosen, "http"])


def service_resource(settings: TelemetrySettings) -> Resource:
    """``service.name`` and ``service.version``, over what ``OTEL_RESOURCE_ATTRIBUTES``
    adds."""
    try:
        version = metadata.version("lamina")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return Resource.create({SERVICE_NAME: settings.service_name, SERVICE_VERSION: version})


def build_tracer_provider(
    settings: TelemetrySettings, exporters: Sequence[SpanExporter], *, record: bool = True
) -> TracerProvider:
    """A tracer provider sampling ``sample_ratio`` of new traces (a span's children follow
    its decision, and so does a server span continuing a trusted caller's trace), each
    exporter behind a batch processor, off the request path. With ``record`` off no span
    is recorded, but each still carries a fresh trace id."""
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if record else ALWAYS_OFF
    provider = TracerProvider(resource=service_resource(settings), sampler=sampler)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def build_meter_provider(
    settings: TelemetrySettings, exporters: Sequence[MetricExporter]
) -> MeterProvider:
    """A meter provider exporting every ``metric_interval_s``, with :func:`metric_views`."""
    interval_ms = settings.metric_interval_s * 1000
    readers = [
        PeriodicExportingMetricReader(e, export_interval_millis=interval_ms) for e in exporters
    ]
    return MeterProvider(
        resource=service_resource(settings), metric_readers=readers, views=metric_views()
    )


def metric_views() -> list[View]:
    """Histogram buckets by unit: seconds, tokens, and ratios between 0 and 1."""
    return [
        View(
            instrument_type=Histogram,
            instrument_unit=unit,
            aggregation=ExplicitBucketHistogramAggregation(buckets),
        )
        for unit, buckets in (
            ("s", SECONDS_BUCKETS),
            ("{token}", TOKEN_BUCKETS),
            ("1", RATIO_BUCKETS),
        )
    ]


def build_exporters(settings: TelemetrySettings, *, console: TextIO | None = None) -> Exporters:
    """The exporters ``settings.exporters`` names; ``console`` is where the console
    exporters write (standard output by default)."""
    built = Exporters()
    for name in dict.fromkeys(settings.exporters):
        if name == "console":
            span_console = (
                ConsoleSpanExporter() if console is None else ConsoleSpanExporter(out=console)
            )
            metric_console = (
                ConsoleMetricExporter() if console is None else ConsoleMetricExporter(out=console)
            )
            built.spans.append(span_console)
            built.metrics.append(metric_console)
        elif name == "otlp":
            span_exporter, metric_exporter = _otlp_exporters(settings)
            built.spans.append(span_exporter)
            built.metrics.append(metric_exporter)
        else:
            span_exporter, metric_exporter = _azure_monitor_exporters(settings)
            built.spans.append(span_exporter)
            built.metrics.append(metric_exporter)
    return built


def _otlp_exporters(settings: TelemetrySettings) -> tuple[SpanExporter, MetricExporter]:
    """OTLP over gRPC or HTTP. Without ``otlp_endpoint`` the exporters read the standard
    ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, certificates, timeout)."""
    endpoint = settings.otlp_endpoint
    try:
        if settings.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            return GrpcSpanExporter(endpoint=endpoint), GrpcMetricExporter(endpoint=endpoint)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TelemetryConfigurationError(
            f"{env_name(('telemetry', 'exporters'))} includes otlp, but the OTLP exporter "
            f"({settings.otlp_protocol}) is not installed ({exc.name} missing): "
            "pip install 'lamina[otlp]'"
        ) from None
    if endpoint is None:
        return OTLPSpanExporter(), OTLPMetricExporter()
    # Over HTTP each signal has its own path below the collector's base URL (the
    # variables' OTEL_EXPORTER_OTLP_ENDPOINT gets the same treatment from the exporter).
    base = endpoint.rstrip("/")
    return (
        OTLPSpanExporter(endpoint=f"{base}/v1/traces"),
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
    )


def _azure_monitor_exporters(settings: TelemetrySettings) -> tuple[SpanExporter, MetricExporter]:
    """Application Insights through the Azure Monitor exporters, added to our own
    providers (the distro's ``configure_azure_monitor`` would install providers of its
    own, with instrumentations we do not choose)."""
    setting = env_name(("telemetry", "azure_monitor_connection_string"))
    secret = settings.azure_monitor_connection_string
    connection_string = (
        secret.get_secret_value() if secret is not None else None
    ) or os.environ.get(AZURE_MONITOR_CONNECTION_STRING_ENV)
    if not connection_string:
        raise TelemetryConfigurationError(
            f"{env_name(('telemetry', 'exporters'))} includes azure_monitor: set {setting} "
            f"or {AZURE_MONITOR_CONNECTION_STRING_ENV} to the Application Insights "
            "resource's connection string"
        )
    try:
        from azure.monitor.opentelemetry.exporter import (
            AzureMonitorMetricExporter,
            AzureMonitorTraceExporter,
        )
    except ImportError:
        raise TelemetryConfigurationError(
            f"{env_name(('telemetry', 'exporters'))} includes azure_monitor, but the Azure "
            "Monitor exporter is not installed: pip install 'lamina[azure-monitor]'"
        ) from None
    try:
        return (
            AzureMonitorTraceExporter(connection_string=connection_string),
            AzureMonitorMetricExporter(connection_string=connection_string),
        )
    except ValueError as exc:
        # The exporter's message ("Invalid instrumentation key") names neither the
        # setting nor the value's expected shape.
        raise TelemetryConfigurationError(
            f"{setting} (or {AZURE_MONITOR_CONNECTION_STRING_ENV}): not a valid Application "
            f"Insights connection string ({exc}); expected "
            "'InstrumentationKey=<guid>;IngestionEndpoint=https://...'"
        ) from None
