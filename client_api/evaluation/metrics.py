"""The metrics of ``lamina eval``, as pure functions of an answer and its gold data.

They run offline and deterministically, so two runs differ only where the
answers differ. The groundedness check here is lexical: it catches sentences
that bring in words or numbers no cited passage contains, not subtle
misreadings of a passage (``--judge`` asks a model for those).
"""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

_CITATION_MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_MARKER_AND_SPACE = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")
_LEADING_MARKERS = re.compile(r"^(?:\[\d+(?:\s*,\s*\d+)*\]\s*)+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[*]?[A-Z0-9\[])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_STOPWORD_TEXT = """
    a about after all also am an and any are as at be been before being but by can could
    did do does each every for from had has have he her his how i if in into is it its may
    me might more most must my no not of on once only or other our out over per she should
    so some such than that the their them then there these they this those to too under
    up us very was we were what when where which while who whom why will with within would
    you your
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_REFUSALS = re.compile(
    r"nothing in the (?:accessible|available|provided) (?:documents|sources)"
    r"|(?:could not|couldn't|cannot|can't|unable to|did not|didn't) (?:find|answer|locate)"
    r"|(?:do not|don't|does not|doesn't) (?:have|contain|mention|say)"
    r"|no (?:information|relevant|documents?|sources?) (?:about|on|in|available|found|that)"
    r"|not (?:mentioned|covered|found|stated) in"
    r"|i (?:do not|don't) know",
    re.IGNORECASE,
)

SUPPORT_THRESHOLD = 0.6
"""Share of a sentence's content words a passage must contain to support it."""


# --- answers -----------------------------------------------------------------------------


def strip_citation_markers(text: str) -> str:
    """``text`` without its ``[n]`` markers (they are not part of what the answer says)."""
    return " ".join(_MARKER_AND_SPACE.sub("", text).split())


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces;
    citation markers are dropped first."""
    lowered = strip_citation_markers(text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", lowered).split())


def answer_f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised answer against the normalised gold answer (SQuAD).

    A long answer that contains the gold answer scores low on precision: read it
    with :func:`answer_contains`, which ignores length."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def answer_contains(prediction: str, gold: str) -> bool:
    """Whether the normalised gold answer occurs in the normalised answer, word for word."""
    expected = normalize_answer(gold).split()
    if not expected:
        return False
    predicted = normalize_answer(prediction).split()
    width = len(expected)
    return any(predicted[i : i + width] == expected for i in range(len(predicted) - width + 1))


def is_refusal(answer: str, citation_count: int) -> bool:
    """An answer that declines: it cites nothing and is empty or says it found nothing.

    An answer without citations that does not decline (one from a model's own
    knowledge) counts as an answer, so that a refusal expected of it is missed."""
    if citation_count:
        return False
    return not answer.strip() or _REFUSALS.search(answer) is not None


# --- citations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CitationScores:
    precision: float
    """Share of the cited documents that are gold sources (0 when nothing is cited)."""
    recall: float
    """Share of the gold sources that are cited."""


def citation_scores(cited: Iterable[str], gold: Collection[str]) -> CitationScores:
    """Precision and recall of the cited documents against the gold ones, by document
    identity: two passages of one document are one citation of it."""
    if not gold:
        raise ValueError("citation scores need at least one gold source")
    documents, expected = set(cited), set(gold)
    if not documents:
        return CitationScores(0.0, 0.0)
    hits = len(documents & expected)
    return CitationScores(hits / len(documents), hits / len(expected))


# --- groundedness ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnswerSentence:
    text: str
    """Without citation markers."""
    refs: tuple[int, ...]
    """The ``[n]`` it cites; empty: it cites nothing itself."""


@dataclass(frozen=True, slots=True)
class Groundedness:
    score: float
    """Share of the answer's sentences that a cited passage supports."""
    checked: int
    unsupported: tuple[str, ...]


def split_sentences(answer: str) -> list[AnswerSentence]:
    """The answer's sentences with the references each cites. A marker after the full
    stop (``... days. [1]``) belongs to the sentence before it."""
    pieces: list[str] = []
    for piece in _SENTENCE_BREAK.split(answer.strip()):
        leading = _LEADING_MARKERS.match(piece)
        if leading and pieces:
            pieces[-1] += " " + leading.group(0).strip()
            piece = piece[leading.end() :]
        if piece.strip():
            pieces.append(piece.strip())
    sentences = []
    for piece in pieces:
        refs = tuple(
            int(ref) for group in _CITATION_MARKER.findall(piece) for ref in group.split(",")
        )
        text = strip_citation_markers(piece)
        if content_words(text):
            sentences.append(AnswerSentence(text, tuple(dict.fromkeys(refs))))
    return sentences


def content_words(text: str) -> list[str]:
    """Normalised words that carry meaning: no stopwords, plural ``s`` dropped."""
    return [_singular(w) for w in normalize_answer(text).split() if w not in _STOPWORDS]


def sentence_support(sentence: str, passage: str) -> float:
    """Share of the sentence's content words found in the passage; 0 when the sentence
    has a number the passage lacks (a changed figure is the commonest invention)."""
    words = content_words(sentence)
    if not words:
        return 1.0
    available = set(content_words(passage))
    if any(_has_digit(w) and w not in available for w in words):
        return 0.0
    return sum(w in available for w in words) / len(words)


def overlap_groundedness(
    answer: str, passages: Mapping[int, str], *, threshold: float = SUPPORT_THRESHOLD
) -> Groundedness | None:
    """Each sentence is supported when the passages it cites (all cited passages, when it
    cites none itself) contain at least ``threshold`` of its content words and every
    number in it. ``passages`` maps a citation's ``[n]`` to its text. ``None`` when the
    answer has no sentence to check."""
    sentences = split_sentences(answer)
    if not sentences:
        return None
    unsupported = []
    for sentence in sentences:
        cited = [passages[r] for r in sentence.refs if r in passages] or list(passages.values())
        if not any(sentence_support(sentence.text, text) >= threshold for text in cited):
            unsupported.append(sentence.text)
    supported = len(sentences) - len(unsupported)
    return Groundedness(supported / len(sentences), len(sentences), tuple(unsupported))


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _has_digit(word: str) -> bool:
    return any(ch.isdigit() for ch in word)


# --- latency -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LatencyStats:
    p50_s: float
    p95_s: float
    mean_s: float


def latency_stats(seconds: Sequence[float]) -> LatencyStats | None:
    """Median, 95th percentile (linear interpolation between ranks) and mean; ``None``
    without any value."""
    if not seconds:
        return None
    if len(seconds) == 1:
        return LatencyStats(seconds[0], seconds[0], seconds[0])
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return LatencyStats(statistics.median(seconds), cuts[94], statistics.fmean(seconds))
