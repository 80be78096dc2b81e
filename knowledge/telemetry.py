"""Spans and metrics of the knowledge layer, on the OpenTelemetry API.

A retrieval is one ``lamina.retrieve`` span with counts only: how many candidates the
index matched in the caller's tenant, how many of them the ACL filter trimmed, how many
passages were returned. Never a chunk's text, nor the id of a chunk the caller may not
see; the query text only when the operator allows content in spans.

The instruments are created at import, on the API's proxies: they bind to the SDK
providers once the composition root installs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, StatusCode
from opentelemetry.util.types import AttributeValue

tracer = trace.get_tracer("lamina.knowledge")
meter = metrics.get_meter("lamina.knowledge")

trimmed_chunks = meter.create_histogram(
    "lamina.retrieval.trimmed",
    unit="{chunk}",
    description="Matches the caller's ACL filter excluded, per retrieval, by index",
    explicit_bucket_boundaries_advisory=[0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
)


@dataclass(frozen=True, slots=True)
class Retrieval:
    """The span of one retrieval, to be told what it found."""

    span: Span
    index: str

    def found(self, *, candidates: int, trimmed: int, returned: int) -> None:
        """``candidates``: matches in the caller's tenant the index looked at (those it
        returned plus those the filter trimmed); ``returned``: passages given back."""
        self.span.set_attributes(
            {
                "lamina.retrieval.candidates": candidates,
                "lamina.retrieval.trimmed": trimmed,
                "lamina.retrieval.returned": returned,
            }
        )
        trimmed_chunks.record(trimmed, {"lamina.retrieval.index": self.index})


@contextmanager
def retrieving(
    *, index: str, top_k: int, tenant_id: str, query: str | None = None
) -> Iterator[Retrieval]:
    """A ``lamina.retrieve`` span, current while the block runs; ``query`` only when
    content may be captured. An error leaving the block marks the span with its type
    alone: a backend's message may quote the query."""
    attributes: dict[str, AttributeValue] = {
        "lamina.retrieval.index": index,
        "lamina.retrieval.top_k": top_k,
        "lamina.tenant.id": tenant_id,
    }
    if query is not None:
        attributes["gen_ai.retrieval.query.text"] = query
    with tracer.start_as_current_span(
        "lamina.retrieve",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield Retrieval(span, index)
        except Exception as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
