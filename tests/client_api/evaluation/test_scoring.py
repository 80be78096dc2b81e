"""Scoring an asked question, and a run: no failure may hide behind a missing score."""

from __future__ import annotations

import pytest

from client_api.evaluation.client import ApiAnswer, CitedPassage, ItemRun
from client_api.evaluation.dataset import EvalItem
from client_api.evaluation.groundedness import OverlapCheck
from client_api.evaluation.passages import CitationSnippets
from client_api.evaluation.scoring import aggregate, score_run
from client_api.evaluation.summary import ItemResult

LEAVE_TEXT = "Every full-time employee receives 27 days of paid annual leave per calendar year."
NOTHING = "Nothing in the accessible documents answers this question."

ANSWERABLE = EvalItem(
    id="leave",
    question="How many days of annual leave?",
    gold_sources=("hr/leave-policy.md",),
    gold_answer="27 days",
)
TO_DECLINE = EvalItem(id="capital", question="Capital of Australia?", expect_refusal=True)


def answered(text: str, *cited: tuple[str, str]) -> ApiAnswer:
    citations = tuple(
        CitedPassage(ref, source, f"chunk-{ref}", snippet)
        for ref, (source, snippet) in enumerate(cited, start=1)
    )
    return ApiAnswer(text, citations, "conversation", "message", "extractive (extractive)")


async def score(item: EvalItem, answer: ApiAnswer | None, error: str | None = None) -> ItemResult:
    run = ItemRun(item, answer, None if answer is None else 0.05, error)
    return await score_run(run, CitationSnippets(), OverlapCheck())


async def test_a_correct_cited_answer_scores_full_marks() -> None:
    result = await score(
        ANSWERABLE, answered(f"{LEAVE_TEXT} [1]", ("hr/leave-policy.md", LEAVE_TEXT))
    )
    assert result.outcome == "answered"
    assert result.scores() == {
        "citation_precision": 1.0,
        "citation_recall": 1.0,
        "answer_f1": pytest.approx(4 / 15),  # 2 of the answer's 13 words, both gold
        "answer_containment": 1.0,
        "groundedness": 1.0,
        "refusal_accuracy": 1.0,
    }


async def test_an_answer_citing_the_wrong_document_scores_zero_on_citations() -> None:
    result = await score(
        ANSWERABLE, answered(f"{LEAVE_TEXT} [1]", ("hr/expenses-policy.md", LEAVE_TEXT))
    )
    assert (result.citation_precision, result.citation_recall) == (0.0, 0.0)
    assert result.cited_sources == ["hr/expenses-policy.md"]


async def test_a_declined_answerable_question_fails_everything_but_groundedness() -> None:
    result = await score(ANSWERABLE, answered(NOTHING))
    assert result.outcome == "refused"
    assert not result.refusal_correct
    assert (result.citation_recall, result.answer_f1, result.answer_contains) == (0.0, 0.0, False)
    assert result.groundedness is None


async def test_a_failed_question_scores_zero_and_keeps_its_error() -> None:
    result = await score(ANSWERABLE, None, "HTTP 500: Something went wrong")
    assert result.outcome == "error"
    assert result.error == "HTTP 500: Something went wrong"
    assert (result.citation_precision, result.citation_recall, result.answer_f1) == (0, 0, 0)
    assert not result.refusal_correct
    assert result.quality() == -1.0


async def test_a_refusal_where_one_is_expected_is_correct_and_scores_nothing_else() -> None:
    result = await score(TO_DECLINE, answered(NOTHING))
    assert result.refusal_correct
    assert result.scores() == {"refusal_accuracy": 1.0}


async def test_an_uncited_claim_where_a_refusal_is_expected_is_wrong_and_ungrounded() -> None:
    result = await score(TO_DECLINE, answered("The capital of Australia is Canberra."))
    assert result.outcome == "answered"
    assert not result.refusal_correct
    assert result.groundedness == 0.0
    assert result.unsupported_sentences == ["The capital of Australia is Canberra."]


async def test_the_run_aggregates_means_over_defined_scores_and_counts_outcomes() -> None:
    results = [
        await score(ANSWERABLE, answered(f"{LEAVE_TEXT} [1]", ("hr/leave-policy.md", LEAVE_TEXT))),
        await score(ANSWERABLE.model_copy(update={"id": "leave-2"}), None, "timeout"),
        await score(TO_DECLINE, answered(NOTHING)),
        await score(TO_DECLINE.model_copy(update={"id": "other"}), answered("Canberra.")),
    ]
    totals = aggregate(results)
    assert (totals.items, totals.answerable, totals.refusal_expected) == (4, 2, 2)
    assert (totals.answered, totals.refused, totals.errors) == (2, 1, 1)
    assert totals.citation_recall == 0.5
    assert totals.citation_precision == 0.5
    assert totals.groundedness == 0.5  # the leave answer 1.0, the uncited "Canberra." 0.0
    assert totals.refusal_accuracy == 0.5
    assert (totals.false_refusals, totals.missed_refusals) == (0, 1)
    assert totals.latency is not None
    assert totals.latency.p50_s == 0.05
