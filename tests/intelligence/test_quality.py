"""Drift and quality monitoring: per answer-prompt version, the share of answers that found
nothing, the share of positive ratings and the median best retrieval score over a sliding
window, as metrics; fed by the orchestrator's turns and its users' ratings.

The monitor runs on a clock the tests move; whole turns go through the real orchestrator,
SQLite index and conversation store and the extractive answerer, and the metrics through
the session's in-memory OpenTelemetry reader.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from inferencing.providers import build_chat_model
from inferencing.settings import InferencingSettings
from intelligence.contracts import (
    Citation,
    MessageStatus,
    Principal,
    TurnFeedback,
    TurnRequest,
)
from intelligence.orchestrator import Orchestrator
from intelligence.quality import QualityMonitor, turn_outcome
from intelligence.stores.sqlite import SqliteConversationStore
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.retrieval import SecurityTrimmedRetriever
from tests.fakes import InMemoryAuditLog
from tests.intelligence.assembly import orchestrator_over_fakes
from tests.knowledge.factories import access, make_chunks
from tests.support.telemetry import MetricsProbe

ALICE = Principal("contoso", "alice", frozenset({"hr"}))
BOB = Principal("contoso", "bob", frozenset({"hr"}))
ANSWER_PROMPT = "grounded_answer@v1"
PROMPT = {"lamina.prompt.id": ANSWER_PROMPT}
CITATION = Citation(1, "ch1", "d1", "hr/leave.md", "Leave", "27 days")


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


def unique_prompt() -> str:
    """A prompt id of this test alone: the session's metrics never saw it before."""
    return f"p{uuid.uuid4().hex[:8]}@v1"


# --- the monitor ------------------------------------------------------------------------------


def test_summaries_per_prompt_over_the_window() -> None:
    clock = Clock()
    monitor = QualityMonitor(window_s=60, clock=clock)
    monitor.record_turn("a@v1", "answered", 0.9)
    monitor.record_turn("a@v1", "no_answer", 0.1)
    monitor.record_turn("a@v1", "answered", 0.7)
    monitor.record_turn("a@v1", "refused", None)
    monitor.record_feedback("a@v1", "positive", turn_id="t1")
    monitor.record_turn("b@v2", "failed", None)

    a, b = monitor.summaries()["a@v1"], monitor.summaries()["b@v2"]
    assert (a.turns, a.answered, a.no_answer, a.refused, a.failed) == (4, 2, 1, 1, 0)
    # Refused and failed turns produced no answer: they are not in the no-answer share.
    assert a.no_answer_ratio == pytest.approx(1 / 3)
    assert a.retrieval_score_median == 0.7
    assert a.feedback_positive_ratio == 1.0
    assert (b.no_answer_ratio, b.feedback_positive_ratio, b.retrieval_score_median) == (
        None,
        None,
        None,
    )

    clock.now += 45
    monitor.record_turn("a@v1", "no_answer", 0.2)
    monitor.record_feedback("a@v1", "negative", turn_id="t2")
    clock.now += 30  # the first events are now older than the window
    a = monitor.summaries()["a@v1"]
    assert (a.turns, a.no_answer, a.retrieval_score_median) == (1, 1, 0.2)
    assert (a.no_answer_ratio, a.feedback_positive_ratio) == (1.0, 0.0)
    # A prompt with nothing left in the window is forgotten.
    assert "b@v2" not in monitor.summaries()


def test_memory_is_bounded_per_prompt() -> None:
    monitor = QualityMonitor(window_s=3600, max_events=3, clock=Clock())
    for score in (0.1, 0.2, 0.3, 0.9, 0.8):
        monitor.record_turn("a@v1", "answered", score)
    summary = monitor.summaries()["a@v1"]
    assert summary.turns == 3
    assert summary.retrieval_score_median == 0.8


def test_counters_histogram_and_gauges_per_prompt(metrics: MetricsProbe) -> None:
    prompt = unique_prompt()
    attributes = {"lamina.prompt.id": prompt}
    monitor = QualityMonitor(window_s=3600, clock=Clock())
    monitor.expose()
    monitor.record_turn(prompt, "answered", 0.8)
    monitor.record_turn(prompt, "no_answer", 0.2)
    monitor.record_turn(prompt, "no_answer", None)
    monitor.record_feedback(prompt, "positive", turn_id="t1")

    assert metrics.amount("lamina.quality.turns", **attributes) == 3
    turns = {"lamina.turn.outcome": "no_answer", **attributes}
    assert metrics.amount("lamina.quality.turns", **turns) == 2
    assert metrics.amount("lamina.quality.retrieval_score", **attributes) == 2
    assert metrics.amount("lamina.quality.feedback", **attributes) == 1
    assert metrics.gauge("lamina.quality.no_answer_ratio", **attributes) == pytest.approx(2 / 3)
    assert metrics.gauge("lamina.quality.feedback_positive_ratio", **attributes) == 1.0
    assert metrics.gauge("lamina.quality.retrieval_score_median", **attributes) == 0.5

    monitor.record_feedback(prompt, "negative", turn_id="t2")
    assert metrics.gauge("lamina.quality.feedback_positive_ratio", **attributes) == 0.5
    # Bounded dimensions only: a prompt id and an outcome or rating, never a user or text.
    for name in ("lamina.quality.turns", "lamina.quality.feedback"):
        for attribute_set in metrics.attribute_sets(name):
            assert set(attribute_set) <= {
                "lamina.prompt.id",
                "lamina.turn.outcome",
                "lamina.feedback.rating",
            }


def test_a_changed_rating_replaces_the_answers_earlier_one_in_the_window(
    metrics: MetricsProbe,
) -> None:
    prompt = unique_prompt()
    attributes = {"lamina.prompt.id": prompt}
    clock = Clock()
    monitor = QualityMonitor(window_s=60, clock=clock)
    monitor.expose()
    monitor.record_feedback(prompt, "positive", turn_id="t1")
    monitor.record_feedback(prompt, "positive", turn_id="t2")
    clock.now += 50
    monitor.record_feedback(prompt, "negative", turn_id="t1")  # t1's owner changed their mind

    summary = monitor.summaries()[prompt]
    assert (summary.positive, summary.negative) == (1, 1)
    assert metrics.gauge("lamina.quality.feedback_positive_ratio", **attributes) == 0.5
    # The counter only goes up: the change counts once more, under its new rating.
    assert metrics.amount("lamina.quality.feedback", **attributes) == 3
    negative = {"lamina.feedback.rating": "negative", **attributes}
    assert metrics.amount("lamina.quality.feedback", **negative) == 1

    # The change is as old as when it was made: it outlives t2's rating in the window.
    clock.now += 30
    summary = monitor.summaries()[prompt]
    assert (summary.positive, summary.negative) == (0, 1)


@pytest.mark.parametrize(
    ("status", "error", "answer", "citations", "tool_results", "expected"),
    [
        (MessageStatus.COMPLETE, None, "27 days [1].", (CITATION,), 0, "answered"),
        (MessageStatus.COMPLETE, None, "I could not find it in the documents.", (), 0, "no_answer"),
        (MessageStatus.COMPLETE, None, "Ungrounded words.", (), 0, "no_answer"),
        (MessageStatus.COMPLETE, None, "Order A-7 has shipped.", (), 1, "answered"),
        (MessageStatus.COMPLETE, None, "I couldn't find order A-7.", (), 1, "no_answer"),
        (MessageStatus.FAILED, "content_filtered", "", (), 0, "refused"),
        (MessageStatus.INTERRUPTED, "model_unavailable", "Half", (), 0, "failed"),
        (MessageStatus.INTERRUPTED, None, "Half", (), 0, None),  # the client went away
        (MessageStatus.AWAITING_APPROVAL, None, "", (), 0, None),
    ],
)
def test_turn_outcomes(
    status: MessageStatus,
    error: str | None,
    answer: str,
    citations: tuple[Citation, ...],
    tool_results: int,
    expected: str | None,
) -> None:
    assert turn_outcome(status, error, answer, citations, tool_results=tool_results) == expected


# --- fed by turns and ratings -------------------------------------------------------------------

LEAVE_TEXT = "Employees receive 27 days of annual leave each year."


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[SqliteKnowledgeIndex]:
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db")
    await index.open()
    await index.replace_document(
        "leave", make_chunks("leave", LEAVE_TEXT, acl=access(public=True)), content_hash="test"
    )
    yield index
    await index.close()


@dataclass
class Assistant:
    orchestrator: Orchestrator
    monitor: QualityMonitor
    audit: InMemoryAuditLog

    async def ask(self, question: str, principal: Principal = ALICE) -> tuple[str, str]:
        result = await self.orchestrator.run_turn(TurnRequest(question), principal)
        return result.conversation_id, result.message_id


@pytest.fixture
def assistant(store: SqliteConversationStore, index: SqliteKnowledgeIndex) -> Assistant:
    (deployment,) = InferencingSettings().registry()
    monitor = QualityMonitor(window_s=3600)
    monitor.expose()
    audit = InMemoryAuditLog()
    orchestrator = orchestrator_over_fakes(
        store,
        build_chat_model(deployment),
        retriever=SecurityTrimmedRetriever(index),
        audit=audit,
        quality=monitor,
    )
    return Assistant(orchestrator, monitor, audit)


async def test_a_turn_that_finds_nothing_raises_the_no_answer_ratio(
    assistant: Assistant, metrics: MetricsProbe
) -> None:
    await assistant.ask("How many days of annual leave do employees receive?")
    assert metrics.gauge("lamina.quality.no_answer_ratio", **PROMPT) == 0.0
    answered = metrics.gauge("lamina.quality.retrieval_score_median", **PROMPT)
    assert answered is not None and answered > 0

    await assistant.ask("Who won the football cup in 1954?")
    assert metrics.gauge("lamina.quality.no_answer_ratio", **PROMPT) == 0.5
    outcome = {"lamina.turn.outcome": "no_answer", **PROMPT}
    assert metrics.amount("lamina.quality.turns", **outcome) == 1
    assert metrics.amount("lamina.quality.turns", **PROMPT) == 2


def feedback_records(assistant: Assistant) -> list[dict[str, object]]:
    return [dict(r.data) for r in assistant.audit.records if r.event == "chat.feedback"]


async def test_one_rating_per_answer_the_latest_counts_and_a_repeat_records_nothing(
    assistant: Assistant, store: SqliteConversationStore, metrics: MetricsProbe
) -> None:
    conversation, turn = await assistant.ask("How many days of annual leave do I get?")
    elsewhere, other = await assistant.ask("How many days of annual leave do we receive?")
    rate = assistant.orchestrator.feedback
    positive = {"lamina.feedback.rating": "positive", **PROMPT}
    negative = {"lamina.feedback.rating": "negative", **PROMPT}
    assert await rate(TurnFeedback(conversation, turn, "positive"), ALICE)
    assert await rate(TurnFeedback(elsewhere, other, "positive"), ALICE)
    assert metrics.gauge("lamina.quality.feedback_positive_ratio", **PROMPT) == 1.0

    # The same rating again, however often: nothing more is counted or audited.
    for _ in range(3):
        assert await rate(TurnFeedback(conversation, turn, "positive"), ALICE)
    assert metrics.amount("lamina.quality.feedback", **positive) == 2
    assert len(feedback_records(assistant)) == 2

    # A changed rating replaces the first: one answer of two is rated positive now.
    assert await rate(TurnFeedback(conversation, turn, "negative", "Too vague", "c-9"), ALICE)
    assert metrics.gauge("lamina.quality.feedback_positive_ratio", **PROMPT) == 0.5
    assert metrics.amount("lamina.quality.feedback", **negative) == 1
    [*_, record] = [r for r in assistant.audit.records if r.event == "chat.feedback"]
    assert (record.tenant_id, record.user_id, record.correlation_id) == ("contoso", "alice", "c-9")
    assert dict(record.data) == {
        "conversation_id": conversation,
        "message_id": turn,
        "rating": "negative",
        "comment": "Too vague",
        "previous": "positive",
        "prompt": ANSWER_PROMPT,
    }
    [_, reply] = await store.messages(ALICE, conversation)
    assert reply.feedback is not None
    assert (reply.feedback.rating, reply.feedback.comment) == ("negative", "Too vague")

    # A new comment under the same rating is audited, not counted.
    assert await rate(TurnFeedback(conversation, turn, "negative", "Wrong year"), ALICE)
    assert metrics.amount("lamina.quality.feedback", **negative) == 1
    last = feedback_records(assistant)[-1]
    assert (last["rating"], last["comment"], last["previous"]) == (
        "negative",
        "Wrong year",
        "negative",
    )

    # Another user's answer, or no answer at all: nothing is recorded.
    assert not await rate(TurnFeedback(conversation, turn, "positive"), BOB)
    assert not await rate(TurnFeedback(conversation, "no-such-turn", "negative"), ALICE)
    assert metrics.amount("lamina.quality.feedback", **PROMPT) == 3
    assert len(feedback_records(assistant)) == 4
