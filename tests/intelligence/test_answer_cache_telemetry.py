"""Each answer cache lookup is a ``lamina.answer_cache.lookup`` span and a count of
``lamina.answer_cache.lookups`` by outcome: the real cache over the real SQLite index,
the in-process store, the hashing embedder or a real embedding deployment on the
OpenAI-compatible simulator; the session's in-memory telemetry capture."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from inferencing.contracts import EmbeddingModel
from inferencing.providers import build_embedding_model
from inferencing.providers.hashing_embeddings import HashingEmbeddingModel
from inferencing.settings import DeploymentSettings
from inferencing.simulator import SimulatorServer
from intelligence.answer_cache import AnswerCache, InProcessAnswerCacheStore
from intelligence.contracts import (
    ConversationMessage,
    Plan,
    PlanStep,
    Principal,
    StepKind,
)
from intelligence.settings import AnswerCacheSettings
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.knowledge.factories import access, make_chunks
from tests.support.telemetry import InMemorySpanExporter, MetricsProbe, children, finished_spans

QUESTION = "How many days of annual leave do employees receive?"
PLAN = Plan(
    steps=(
        PlanStep("s1", StepKind.RETRIEVE, "search", query="q"),
        PlanStep("s2", StepKind.ANSWER, "answer", depends_on=("s1",)),
    ),
    planner="deterministic",
)

tracer = trace.get_tracer("tests")


@pytest.fixture
def alice() -> Principal:
    """A user of this test alone: metrics are cumulative for the session."""
    return Principal(
        "contoso", f"alice-{uuid.uuid4().hex[:8]}", frozenset({"hr"}), frozenset({"employee"})
    )


@pytest.fixture
async def retriever(tmp_path: Path) -> AsyncIterator[SecurityTrimmedRetriever]:
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await index.open()
    await index.replace_document(
        "leave",
        make_chunks("leave", "Employees receive 27 days of annual leave.", acl=access()),
        content_hash="test",
    )
    yield SecurityTrimmedRetriever(index)
    await index.close()


def make_cache(
    retriever: SecurityTrimmedRetriever, embedder: EmbeddingModel | None = None
) -> AnswerCache:
    return AnswerCache(
        store=InProcessAnswerCacheStore(),
        embedder=embedder or HashingEmbeddingModel(),
        retriever=retriever,
        settings=AnswerCacheSettings(enabled=True),
        model_version="gpt-4o-mini@2024-07-18",
    )


async def ask(
    cache: AnswerCache, principal: Principal, *, history: tuple[ConversationMessage, ...] = ()
) -> str:
    """Look up under a turn's span; on a miss, store an answer. Returns the status."""
    with tracer.start_as_current_span("turn"):
        lookup = await cache.lookup(
            question=QUESTION, history=history, principal=principal, prompt_version="p@v1"
        )
    if lookup.hit is None:
        await cache.remember(
            lookup,
            answer="Twenty-seven days.",
            citations=(),
            plan=PLAN,
            sources=(),
            plan_summary=None,
            principal=principal,
        )
    return lookup.outcome.status


def lookups() -> list[ReadableSpan]:
    return finished_spans("lamina.answer_cache.lookup")


def outcome_count(metrics: MetricsProbe, outcome: str) -> float:
    return metrics.amount("lamina.answer_cache.lookups", **{"lamina.cache.outcome": outcome})


async def test_a_lookup_is_a_span_under_the_turn_and_a_count_by_outcome(
    retriever: SecurityTrimmedRetriever,
    alice: Principal,
    spans: InMemorySpanExporter,
    metrics: MetricsProbe,
) -> None:
    cache = make_cache(retriever)

    assert await ask(cache, alice) == "miss"
    assert await ask(cache, alice) == "hit"

    miss, hit = lookups()
    turns = finished_spans("turn")
    assert [children(turn, spans.get_finished_spans()) for turn in turns] == [[miss], [hit]]
    assert (miss.attributes or {})["lamina.cache.outcome"] == "miss"
    assert dict(hit.attributes or {}) == {
        "lamina.cache.outcome": "hit",
        "lamina.cache.similarity": pytest.approx(1.0),
    }
    assert outcome_count(metrics, "miss") == 1
    assert outcome_count(metrics, "hit") == 1
    values = " ".join(str(v) for s in (miss, hit) for v in (s.attributes or {}).values())
    assert QUESTION not in values and "Twenty-seven" not in values


async def test_a_follow_up_the_cache_does_not_answer_is_a_bypass_with_its_reason(
    retriever: SecurityTrimmedRetriever, alice: Principal, metrics: MetricsProbe
) -> None:
    earlier = ConversationMessage(
        id=uuid.uuid4().hex,
        conversation_id="c1",
        role="user",
        content="Hello",
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )

    assert await ask(make_cache(retriever), alice, history=(earlier,)) == "skipped"

    (span,) = lookups()
    assert dict(span.attributes or {}) == {
        "lamina.cache.outcome": "bypass",
        "lamina.cache.reason": "multi_turn",
    }
    assert outcome_count(metrics, "bypass") == 1
    for attributes in metrics.attribute_sets("lamina.answer_cache.lookups"):
        assert set(attributes) == {"lamina.cache.outcome"}
        assert alice.user_id not in attributes.values()


async def test_the_question_embedding_call_is_a_child_of_the_lookup(
    retriever: SecurityTrimmedRetriever,
    alice: Principal,
    simulator: SimulatorServer,
    spans: InMemorySpanExporter,
) -> None:
    deployment = DeploymentSettings.model_validate(
        {
            "name": "embeddings",
            "model": "text-embedding-3-small",
            "base_url": simulator.openai_base_url,
            "api_key": "sk-sim",
        }
    )
    embedder = build_embedding_model(deployment)
    try:
        await ask(make_cache(retriever, embedder), alice)
    finally:
        await embedder.aclose()

    (lookup,) = lookups()
    (embedding,) = finished_spans("embeddings text-embedding-3-small")
    assert children(lookup, spans.get_finished_spans()) == [embedding]
