"""A retrieval's span and metric: the real SQLite index behind the security-trimmed
retriever, the session's in-memory telemetry capture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import IndexUnavailable, RetrievalQuery
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.knowledge.factories import Caller, access, make_chunks
from tests.support.telemetry import InMemorySpanExporter, MetricsProbe, children, finished_spans

QUESTION = "annual leave days"
ALICE = Caller("contoso", "alice@contoso.com", frozenset({"hr"}))

tracer = trace.get_tracer("tests")


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    """Three chunks about leave Alice may read, two she may not (finance's)."""
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await index.open()
    await index.replace_document(
        "handbook",
        make_chunks(
            "handbook",
            "annual leave: 27 days a year",
            "carry over up to 5 days of annual leave",
            "annual leave requests go to your manager",
            acl=access(groups=["hr"]),
        ),
        content_hash="handbook",
    )
    await index.replace_document(
        "memo",
        make_chunks(
            "memo",
            "annual leave liability: USD 4.85 million",
            "annual leave accruals by cost centre",
            acl=access(groups=["finance"]),
        ),
        content_hash="memo",
    )
    yield index
    await index.close()


async def test_a_retrieval_is_a_span_with_its_counts_under_the_callers(
    index: SqliteKnowledgeIndex, spans: InMemorySpanExporter
) -> None:
    retriever = SecurityTrimmedRetriever(index)

    with tracer.start_as_current_span("step") as step:
        result = await retriever.retrieve(RetrievalQuery(QUESTION, top_k=2), ALICE)

    (span,) = finished_spans("lamina.retrieve")
    (parent,) = finished_spans("step")
    assert children(parent, spans.get_finished_spans()) == [span]
    assert span.context is not None and span.context.trace_id == step.get_span_context().trace_id
    assert len(result.passages) == 2
    assert result.trimmed_count == 2
    assert dict(span.attributes or {}) == {
        "lamina.retrieval.index": index.name,
        "lamina.retrieval.top_k": 2,
        "lamina.retrieval.candidates": 4,
        "lamina.retrieval.trimmed": 2,
        "lamina.retrieval.returned": 2,
        "lamina.tenant.id": "contoso",
    }


async def test_no_text_or_trimmed_chunk_reaches_the_span_unless_content_capture_is_on(
    index: SqliteKnowledgeIndex, spans: InMemorySpanExporter
) -> None:
    await SecurityTrimmedRetriever(index).retrieve(RetrievalQuery(QUESTION), ALICE)
    await SecurityTrimmedRetriever(index, capture_content=True).retrieve(
        RetrievalQuery(QUESTION), ALICE
    )

    quiet, capturing = finished_spans("lamina.retrieve")
    values = " ".join(str(v) for v in (quiet.attributes or {}).values())
    for secret in (QUESTION, "4.85", "memo-0", "memo-1", "27 days"):
        assert secret not in values
    assert (capturing.attributes or {})["gen_ai.retrieval.query.text"] == QUESTION
    captured = " ".join(str(v) for v in (capturing.attributes or {}).values())
    assert "memo-0" not in captured and "4.85" not in captured, "never the trimmed chunks"


async def test_trimmed_counts_are_a_histogram_by_index_without_the_user(
    index: SqliteKnowledgeIndex, metrics: MetricsProbe
) -> None:
    retriever = SecurityTrimmedRetriever(index)
    bob = Caller("contoso", f"bob-{uuid4().hex[:8]}", frozenset({"hr"}))

    await retriever.retrieve(RetrievalQuery(QUESTION), bob)
    await retriever.retrieve(RetrievalQuery("annual leave liability"), bob)

    assert metrics.amount("lamina.retrieval.trimmed", **{"lamina.retrieval.index": index.name}) == 2
    for attributes in metrics.attribute_sets("lamina.retrieval.trimmed"):
        assert set(attributes) == {"lamina.retrieval.index"}
        assert bob.user_id not in attributes.values()


async def test_a_failing_index_marks_the_span_with_the_error_type_only(
    index: SqliteKnowledgeIndex,
) -> None:
    retriever = SecurityTrimmedRetriever(index)
    await index.close()

    with pytest.raises(IndexUnavailable):
        await retriever.retrieve(RetrievalQuery(QUESTION), ALICE)

    (span,) = finished_spans("lamina.retrieve")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "IndexUnavailable"
    assert "lamina.retrieval.returned" not in (span.attributes or {})
    assert span.events == (), "no exception event: a backend's message may quote the query"
