"""In-memory capture of the spans and metrics every layer records, for the whole test
session.

OpenTelemetry's global tracer and meter providers can be set once per process, so the
session installs SDK providers at start-up (``tests/conftest.py``) that write to an
in-memory span exporter and an in-memory metric reader; the app's own telemetry set-up
finds them in place and adds no exporter (none is configured in tests). Spans are cleared
before each test; metrics are cumulative for the session, so a test reads what changed
since it began (:class:`MetricsProbe`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

SPANS = InMemorySpanExporter()
METRICS = InMemoryMetricReader()


def install() -> None:
    """Make the in-memory capture the process's global providers (once)."""
    resource = Resource.create({"service.name": "lamina-tests"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[METRICS]))


def finished_spans(name: str | None = None) -> list[ReadableSpan]:
    """Spans ended since the test began, oldest first; only those called ``name``."""
    return [s for s in SPANS.get_finished_spans() if name is None or s.name == name]


def children(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """The direct children of ``span`` among ``spans``."""
    assert span.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id]


Point = NumberDataPoint | HistogramDataPoint


def _points() -> dict[tuple[str, frozenset[tuple[str, Any]]], Point]:
    data = METRICS.get_metrics_data()
    found: dict[tuple[str, frozenset[tuple[str, Any]]], Point] = {}
    if data is None:
        return found
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = frozenset((point.attributes or {}).items())
                    found[(metric.name, attributes)] = point  # type: ignore[assignment]
    return found


def _amount(point: Point) -> float:
    """A counter's sum, or how many values a histogram recorded."""
    if isinstance(point, HistogramDataPoint):
        return float(point.count)
    return float(point.value)


@dataclass
class MetricsProbe:
    """What the metrics recorded since the probe was made."""

    _baseline: dict[tuple[str, frozenset[tuple[str, Any]]], Point] = field(default_factory=_points)

    def amount(self, name: str, **attributes: Any) -> float:
        """Sum of a counter (or count of a histogram) added since the probe began, over
        every point whose attributes include ``attributes``."""
        total = 0.0
        for (metric, attrs), point in _points().items():
            if metric != name or not _includes(attrs, attributes):
                continue
            before = self._baseline.get((metric, attrs))
            total += _amount(point) - (_amount(before) if before is not None else 0.0)
        return total

    def attribute_sets(self, name: str) -> list[Mapping[str, Any]]:
        """Every attribute set recorded for ``name`` in the session (to check cardinality)."""
        return [dict(attrs) for metric, attrs in _points() if metric == name]

    def gauge(self, name: str, **attributes: Any) -> float | None:
        """The latest value of an observable gauge whose attributes include these."""
        for (metric, attrs), point in _points().items():
            if metric == name and _includes(attrs, attributes):
                return float(point.value) if isinstance(point, NumberDataPoint) else None
        return None


def _includes(attrs: frozenset[tuple[str, Any]], wanted: Mapping[str, Any]) -> bool:
    present = dict(attrs)
    return all(present.get(key) == value for key, value in wanted.items())


def clear_spans() -> Iterator[None]:
    SPANS.clear()
    yield
