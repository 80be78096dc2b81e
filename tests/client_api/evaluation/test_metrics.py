"""The scoring functions of ``lamina eval``: each must reward the right answer and be able
to fail the wrong one."""

from __future__ import annotations

import pytest

from client_api.evaluation.metrics import (
    answer_contains,
    answer_f1,
    citation_scores,
    is_refusal,
    latency_stats,
    normalize_answer,
    overlap_groundedness,
    sentence_support,
    split_sentences,
)

LEAVE = (
    "Every full-time employee receives 27 days of paid annual leave per calendar year, on top "
    "of public holidays in their country of employment."
)
CARRY_OVER = "You may carry up to five unused days into the next calendar year."


# --- answers -----------------------------------------------------------------------------


def test_normalisation_drops_case_punctuation_articles_and_citation_markers() -> None:
    assert normalize_answer("The  answer is: 27 Days! [1][2]") == "answer is 27 days"


def test_f1_is_one_for_the_gold_answer_and_zero_for_a_wrong_one() -> None:
    assert answer_f1("27 days [1].", "27 days") == 1.0
    assert answer_f1("35 weeks", "27 days") == 0.0


def test_f1_of_a_long_answer_rewards_the_overlap_only() -> None:
    score = answer_f1("You get 27 days of paid annual leave each year.", "27 days")
    assert score == pytest.approx(2 * 0.2 * 1.0 / (0.2 + 1.0))  # 2 of 10 words, both gold


def test_containment_needs_the_gold_words_in_order() -> None:
    assert answer_contains("Claims go through Ledgerline, the portal [1].", "Ledgerline")
    assert answer_contains("It is USD 4.85 million.", "USD 4.85 million")
    assert not answer_contains("It is USD 4.80 million.", "USD 4.85 million")
    assert not answer_contains("million USD 4.85", "USD 4.85 million")
    assert not answer_contains("anything", "")


@pytest.mark.parametrize(
    "answer",
    [
        "Nothing in the accessible documents answers this question.",
        "I could not find this in the documents available to you.",
        "The documents do not mention a dog policy.",
        "",
    ],
)
def test_an_uncited_answer_that_declines_is_a_refusal(answer: str) -> None:
    assert is_refusal(answer, citation_count=0)


def test_a_cited_answer_or_an_uncited_claim_is_not_a_refusal() -> None:
    assert not is_refusal("I could not find the exact figure, but it is 27 days [1].", 1)
    assert not is_refusal("The capital of Australia is Canberra.", 0)


# --- citations ---------------------------------------------------------------------------


def test_citing_exactly_the_gold_documents_scores_one() -> None:
    scores = citation_scores(["hr/leave-policy.md"], ["hr/leave-policy.md"])
    assert (scores.precision, scores.recall) == (1.0, 1.0)


def test_wrong_citations_score_zero() -> None:
    scores = citation_scores(["hr/expenses-policy.md"], ["hr/leave-policy.md"])
    assert (scores.precision, scores.recall) == (0.0, 0.0)


def test_no_citation_scores_zero() -> None:
    scores = citation_scores([], ["hr/leave-policy.md"])
    assert (scores.precision, scores.recall) == (0.0, 0.0)


def test_citations_count_documents_not_passages() -> None:
    scores = citation_scores(
        ["product/atlas-faq.txt", "product/atlas-faq.txt", "hr/leave-policy.md"],
        ["product/atlas-faq.txt", "product/atlas-user-guide.pdf"],
    )
    assert (scores.precision, scores.recall) == (0.5, 0.5)


def test_citation_scores_need_a_gold_source() -> None:
    with pytest.raises(ValueError, match="gold source"):
        citation_scores(["a.md"], [])


# --- groundedness ------------------------------------------------------------------------


def test_sentences_keep_the_references_they_cite() -> None:
    sentences = split_sentences("You get 27 days [1]. Five days carry over. [2] Ask HR [1, 2].")
    assert [(s.text, s.refs) for s in sentences] == [
        ("You get 27 days.", (1,)),
        ("Five days carry over.", (2,)),
        ("Ask HR.", (1, 2)),
    ]


def test_a_quoted_sentence_is_supported_and_a_changed_figure_is_not() -> None:
    assert sentence_support("Every full-time employee receives 27 days of paid leave.", LEAVE) == 1
    assert sentence_support("Every full-time employee receives 35 days of paid leave.", LEAVE) == 0


def test_an_answer_quoting_its_passages_is_fully_grounded() -> None:
    answer = f"{LEAVE} [1] {CARRY_OVER} [2]"
    grounded = overlap_groundedness(answer, {1: LEAVE, 2: CARRY_OVER})
    assert grounded is not None
    assert (grounded.score, grounded.checked, grounded.unsupported) == (1.0, 2, ())


def test_an_invented_sentence_is_unsupported() -> None:
    answer = f"{LEAVE} [1] Unused days are paid out in cash every December [1]."
    grounded = overlap_groundedness(answer, {1: LEAVE})
    assert grounded is not None
    assert grounded.score == 0.5
    assert grounded.unsupported == ("Unused days are paid out in cash every December.",)


def test_a_sentence_is_checked_against_the_passage_it_cites() -> None:
    # True of passage 1, but attributed to passage 2.
    grounded = overlap_groundedness(f"{LEAVE} [2]", {1: LEAVE, 2: CARRY_OVER})
    assert grounded is not None
    assert grounded.score == 0.0


def test_a_sentence_without_a_marker_may_lean_on_any_cited_passage() -> None:
    grounded = overlap_groundedness(CARRY_OVER, {1: LEAVE, 2: CARRY_OVER})
    assert grounded is not None
    assert grounded.score == 1.0


def test_an_answer_without_content_has_nothing_to_check() -> None:
    assert overlap_groundedness("[1]", {1: LEAVE}) is None


# --- latency -----------------------------------------------------------------------------


def test_latency_percentiles_interpolate_between_ranks() -> None:
    stats = latency_stats([float(n) for n in range(1, 101)])
    assert stats is not None
    assert (stats.p50_s, stats.mean_s) == (50.5, 50.5)
    assert stats.p95_s == pytest.approx(95.05)


def test_latency_of_one_or_no_answer() -> None:
    one = latency_stats([0.2])
    assert one is not None
    assert (one.p50_s, one.p95_s, one.mean_s) == (0.2, 0.2, 0.2)
    assert latency_stats([]) is None
