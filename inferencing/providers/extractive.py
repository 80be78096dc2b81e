"""An answerer without a model: it quotes the grounding documents that fit the question.

It is Lamina's offline default. Every sentence of an answer is copied from a
document (whitespace and list markers tidied) and followed by that document's
``[ref]``; the only words of its own are the fixed phrase that admits nothing
fits. Same request, same answer.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from inferencing.contracts import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    GroundingDocument,
    InferenceCaller,
    ModelCapabilities,
    Role,
    Usage,
)

NOTHING_FOUND = "Nothing in the accessible documents answers this question."

_WORD = re.compile(r"\w+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_MARKER = re.compile(r"(?:#{1,6}|[>*\-•+]|\d{1,3}[.)])\s+")
_EMPHASIS = re.compile(r"\*\*|__|`")
_WORD_GROUP = re.compile(r"(?:\S+\s*){1,3}|\s+")
_STOPWORD_TEXT = """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing done down during
    each either else etc ever every few for from further get gets got had has have having
    he her here hers herself him himself his how however i if in into is it its itself
    just know let like may me might mine more most much must my myself need no nor not
    now of off on once only or other our ours ourselves out over own please same shall
    she should so some such tell than that the their theirs them themselves then there
    these they this those through to too under until up upon us very via want was we
    were what whatever when where whether which while who whom whose why will with within
    without would yes yet you your yours yourself yourselves
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Of the sentences that match the question, keep those scoring at least this share of the best.
_KEEP_RATIO = 0.6
# A sentence must carry this share of the question's term weight to count as an answer.
_MIN_COVERAGE = 0.3
_MIN_SENTENCE_WORDS = 4
_MAX_SENTENCE_WORDS = 60

_Weight = Callable[[str], float]


def terms(text: str) -> list[str]:
    """Content words of ``text``: lower-cased, accents and plural ``s`` dropped, no stopwords."""
    folded = unicodedata.normalize("NFKD", text.lower())
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    words = (_singular(w) for w in _WORD.findall(folded) if w not in _STOPWORDS)
    return [w for w in words if len(w) > 1 or w.isdigit()]


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def estimate_tokens(text: str) -> int:
    """About four tokens for every three words, as with English and GPT tokenizers."""
    return math.ceil(len(text.split()) * 4 / 3)


@dataclass(frozen=True, slots=True)
class _Sentence:
    ref: int
    doc_rank: int
    position: int
    text: str
    terms: frozenset[str]
    pairs: frozenset[tuple[str, str]]

    @property
    def answers(self) -> bool:
        """Long enough to say something, and not itself a question (as in a FAQ)."""
        words = len(self.text.split())
        return _MIN_SENTENCE_WORDS <= words <= _MAX_SENTENCE_WORDS and not self.text.endswith("?")


@dataclass(frozen=True, slots=True)
class _Answer:
    text: str
    finish_reason: str


class ExtractiveAnswerer:
    """A :class:`~inferencing.contracts.ChatModel` that answers only from
    ``request.documents``: the sentences that best match the last user message (up to
    ``max_sentences``, at least two where the passage has them), best first, each cited
    ``[ref]``. It streams the same answer in groups of a few words. Tools are never called."""

    def __init__(self, *, max_sentences: int = 4) -> None:
        if max_sentences < 1:
            raise ValueError("max_sentences must be at least 1")
        self._max_sentences = max_sentences
        self._capabilities = ModelCapabilities(
            streaming=True, tool_calls=False, json_schema=False, generative=False
        )

    @property
    def name(self) -> str:
        return "extractive"

    @property
    def capabilities(self) -> ModelCapabilities:
        return self._capabilities

    async def complete(self, request: ChatRequest, caller: InferenceCaller) -> ChatResponse:
        answer = self._answer(request)
        return ChatResponse(
            message=ChatMessage(Role.ASSISTANT, content=answer.text),
            finish_reason=answer.finish_reason,
            model=self.name,
            usage=_usage(request, answer.text),
        )

    async def stream(
        self, request: ChatRequest, caller: InferenceCaller
    ) -> AsyncIterator[ChatDelta]:
        answer = self._answer(request)
        for group in _WORD_GROUP.findall(answer.text):
            yield ChatDelta(content=group)
        yield ChatDelta(finish_reason=answer.finish_reason, usage=_usage(request, answer.text))

    async def aclose(self) -> None:
        return None

    # --- answering -----------------------------------------------------------------

    def _answer(self, request: ChatRequest) -> _Answer:
        question = _last_user_text(request.messages)
        chosen = self._choose(question, request.documents)
        if not chosen:
            return _Answer(NOTHING_FOUND, "stop")
        return _fit(chosen, request.max_tokens)

    def _choose(self, question: str, documents: Sequence[GroundingDocument]) -> list[_Sentence]:
        asked = terms(question)
        wanted = set(asked)
        sentences = [s for rank, doc in enumerate(documents) for s in _sentences(doc, rank)]
        if not wanted or not sentences:
            return []
        # Rarer words say more about what is asked: weigh terms by inverse sentence frequency.
        frequency = Counter(t for s in sentences for t in s.terms)
        count = len(sentences)

        def weight(term: str) -> float:
            return math.log(1 + count / (frequency[term] or 0.5))

        total = sum(weight(t) for t in wanted)
        phrases = _pairs(asked)
        doc_coverage = _document_coverage(documents, wanted, weight, total)
        scored: list[tuple[float, _Sentence]] = []
        for sentence in sentences:
            if not sentence.answers:
                continue
            coverage = sum(weight(t) for t in wanted & sentence.terms) / total
            if coverage < _MIN_COVERAGE:
                continue
            # Question words side by side in the sentence ("home office") count extra, and
            # sentences from the documents that fit the question best overall are preferred.
            together = sum(min(weight(a), weight(b)) for a, b in phrases & sentence.pairs)
            score = coverage + 0.5 * together / total + 0.5 * doc_coverage[sentence.doc_rank]
            scored.append((score, sentence))
        if not scored:
            return []
        scored.sort(key=lambda item: (-item[0], item[1].doc_rank, item[1].position))
        best = scored[0][0]
        chosen: list[_Sentence] = []
        for score, sentence in scored:
            if len(chosen) == self._max_sentences or score < _KEEP_RATIO * best:
                break
            if any(sentence.terms == c.terms for c in chosen):
                continue
            chosen.append(sentence)
        if len(chosen) == 1 and self._max_sentences > 1:
            # One sentence rarely stands alone: add its neighbour in the passage for context.
            neighbour = _neighbour(chosen[0], sentences)
            if neighbour is not None:
                return sorted((chosen[0], neighbour), key=lambda s: s.position)
        return chosen


def _last_user_text(messages: Sequence[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role is Role.USER and message.content:
            return message.content
    return ""


def _sentences(document: GroundingDocument, rank: int) -> list[_Sentence]:
    found: list[_Sentence] = []
    for unit in _text_units(document.text):
        for piece in _SENTENCE_BREAK.split(unit):
            text = " ".join(piece.split())
            if text:
                words = terms(text)
                found.append(
                    _Sentence(document.ref, rank, len(found), text, frozenset(words), _pairs(words))
                )
    return found


def _pairs(words: Sequence[str]) -> frozenset[tuple[str, str]]:
    """Adjacent content words, order-free: ("office", "home") is ("home", "office")."""
    return frozenset((a, b) if a <= b else (b, a) for a, b in itertools.pairwise(words) if a != b)


def _text_units(text: str) -> list[str]:
    """Paragraphs, list items and headings, with hard-wrapped lines joined back together."""
    units: list[str] = []
    current: list[str] = []

    def close() -> None:
        if current:
            units.append(" ".join(current))
            current.clear()

    for line in text.splitlines():
        stripped = _EMPHASIS.sub("", line).strip()
        if not stripped:
            close()
            continue
        if stripped.startswith("|"):
            # A table row stands alone; its cells are read as one sentence.
            close()
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if any(c.strip("-: ") for c in cells):
                units.append("; ".join(c for c in cells if c))
            continue
        marker = _LIST_MARKER.match(stripped)
        if marker:
            close()
            stripped = stripped[marker.end() :]
            if marker.group(0).startswith("#"):
                units.append(stripped)
                continue
        current.append(stripped)
    close()
    return units


def _document_coverage(
    documents: Sequence[GroundingDocument],
    wanted: set[str],
    weight: _Weight,
    total: float,
) -> list[float]:
    coverage = []
    for document in documents:
        present = set(terms(document.title)) | set(terms(document.text))
        coverage.append(sum(weight(t) for t in wanted & present) / total)
    return coverage


def _neighbour(sentence: _Sentence, sentences: Sequence[_Sentence]) -> _Sentence | None:
    same_document = [s for s in sentences if s.doc_rank == sentence.doc_rank and s is not sentence]
    after = [s for s in same_document if s.position == sentence.position + 1]
    before = [s for s in same_document if s.position == sentence.position - 1]
    for candidate in (*after, *before):
        if candidate.answers:
            return candidate
    return None


def _cite(sentence: _Sentence, words: int | None = None) -> str:
    """The sentence with its ``[ref]`` before the closing punctuation; cut to ``words``."""
    text = sentence.text if words is None else " ".join(sentence.text.split()[:words])
    body = text.rstrip(" .!?,;:")
    stop = text[-1] if words is None and text[-1] in ".!?" else "."
    return f"{body} [{sentence.ref}]{stop}"


def _fit(chosen: list[_Sentence], max_tokens: int | None) -> _Answer:
    """The cited answer, shortened to ``max_tokens`` (estimated) when a limit is set."""
    parts = [_cite(s) for s in chosen]
    if max_tokens is None or estimate_tokens(" ".join(parts)) <= max_tokens:
        return _Answer(" ".join(parts), "stop")
    while len(parts) > 1 and estimate_tokens(" ".join(parts)) > max_tokens:
        parts.pop()
    if estimate_tokens(parts[0]) <= max_tokens:
        return _Answer(" ".join(parts), "length")
    words = len(chosen[0].text.split())
    while words > 1 and estimate_tokens(_cite(chosen[0], words)) > max_tokens:
        words -= 1
    return _Answer(_cite(chosen[0], words), "length")


def _usage(request: ChatRequest, answer: str) -> Usage:
    read = [m.content or "" for m in request.messages]
    read += [f"{d.title} {d.text}" for d in request.documents]
    return Usage(
        input_tokens=estimate_tokens(" ".join(read)), output_tokens=estimate_tokens(answer)
    )
