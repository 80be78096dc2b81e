"""Scores each answered question against its gold data, and the run as a whole.

Conventions, so that no failure hides:

- An answerable question that got an error or a refusal scores 0 on citations
  and answer; a question to decline has no citation or answer score, only
  refusal correctness.
- Groundedness is over the answers given (an answer that declines, or none,
  has nothing to ground); an answer that cites nothing yet states something
  scores 0 (nothing supports it).
- Means are over the items where a score is defined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from client_api.evaluation.client import ItemRun
from client_api.evaluation.groundedness import GroundednessCheck, JudgeError
from client_api.evaluation.metrics import (
    answer_contains,
    answer_f1,
    citation_scores,
    is_refusal,
    latency_stats,
    split_sentences,
)
from client_api.evaluation.passages import PassageSource
from client_api.evaluation.summary import Aggregates, ItemResult, LatencySummary, Outcome


async def score_run(
    run: ItemRun, passages: PassageSource, groundedness: GroundednessCheck
) -> ItemResult:
    item = run.item
    result = ItemResult(
        id=item.id,
        question=item.question,
        user=item.caller.user,
        expect_refusal=item.expect_refusal,
        outcome="error",
        error=run.error,
        gold_sources=list(item.gold_sources),
        gold_answer=item.gold_answer,
        refusal_correct=False,
        latency_s=run.latency_s,
    )
    if run.answer is None:
        if not item.expect_refusal:
            result = _zero_answer_scores(result, item.gold_sources)
        return result
    answer = run.answer
    refused = is_refusal(answer.answer, len(answer.citations))
    outcome: Outcome = "refused" if refused else "answered"
    result = result.model_copy(
        update={
            "outcome": outcome,
            "answer": answer.answer,
            "cited_sources": sorted({c.source for c in answer.citations}),
            "refusal_correct": refused == item.expect_refusal,
        }
    )
    if not item.expect_refusal:
        result = _answer_scores(result, item.gold_sources, item.gold_answer)
    if refused:
        return result
    if not answer.citations:
        unsupported = [s.text for s in split_sentences(answer.answer)]
        return result.model_copy(update={"groundedness": 0.0, "unsupported_sentences": unsupported})
    texts = await passages.passages(answer, item.caller)
    try:
        grounded = await groundedness.check(answer.answer, texts)
    except JudgeError as exc:
        return result.model_copy(update={"groundedness_error": str(exc)})
    if grounded is None:
        return result
    return result.model_copy(
        update={
            "groundedness": grounded.score,
            "unsupported_sentences": list(grounded.unsupported),
        }
    )


def _answer_scores(result: ItemResult, gold_sources: Sequence[str], gold: str) -> ItemResult:
    update: dict[str, object] = {
        "answer_f1": answer_f1(result.answer, gold),
        "answer_contains": answer_contains(result.answer, gold),
    }
    if gold_sources:
        cited = citation_scores(result.cited_sources, gold_sources)
        update |= {"citation_precision": cited.precision, "citation_recall": cited.recall}
    return result.model_copy(update=update)


def _zero_answer_scores(result: ItemResult, gold_sources: Sequence[str]) -> ItemResult:
    update: dict[str, object] = {"answer_f1": 0.0, "answer_contains": False}
    if gold_sources:
        update |= {"citation_precision": 0.0, "citation_recall": 0.0}
    return result.model_copy(update=update)


def aggregate(results: Sequence[ItemResult]) -> Aggregates:
    answerable = [r for r in results if not r.expect_refusal]
    latency = latency_stats([r.latency_s for r in results if r.outcome != "error" and r.latency_s])
    return Aggregates(
        items=len(results),
        answerable=len(answerable),
        refusal_expected=len(results) - len(answerable),
        answered=sum(r.outcome == "answered" for r in results),
        refused=sum(r.outcome == "refused" for r in results),
        errors=sum(r.outcome == "error" for r in results),
        citation_precision=_mean(r.citation_precision for r in results),
        citation_recall=_mean(r.citation_recall for r in results),
        answer_f1=_mean(r.answer_f1 for r in results),
        answer_containment=_mean(r.answer_contains for r in results),
        groundedness=_mean(r.groundedness for r in results),
        refusal_accuracy=_mean(r.refusal_correct for r in results),
        false_refusals=sum(r.outcome == "refused" for r in answerable),
        missed_refusals=sum(r.expect_refusal and r.outcome == "answered" for r in results),
        groundedness_failures=sum(r.groundedness_error is not None for r in results),
        latency=None
        if latency is None
        else LatencySummary(p50_s=latency.p50_s, p95_s=latency.p95_s, mean_s=latency.mean_s),
    )


def _mean(values: Iterable[float | None]) -> float | None:
    defined = [float(v) for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
