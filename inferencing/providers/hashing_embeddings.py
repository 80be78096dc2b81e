"""An offline embedding model: words and character n-grams, feature-hashed.

This is lexical, not semantic. Two texts come out close when they share words:
a question asked again with other capitals, punctuation, filler words ("please",
"hi", "the"), plurals or mildly reordered words matches itself, and a typo still
shares most of its character n-grams. Numbers and negations weigh double, so "2024"
against "2025", or an added "not", keeps two questions apart. A true paraphrase
("How much holiday do I get?" against "What is my annual leave allowance?") shares
no words and does not match: that needs a real embedding model (e.g. Azure OpenAI
embeddings). It needs no model download, no network and no numpy, and the same text
always gives the same vector in every process.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

from inferencing.contracts import EmbeddingResponse, InferenceCaller, Usage

_WORD = re.compile(r"\w+")

# Words that carry no question of their own. Deliberately short: negations, question
# words ("when" vs "where") and modal verbs change what is asked, so they stay.
_FILLER_TEXT = "a an the please pls kindly hi hello hey thanks thank um uh er ok okay so well just"
FILLER_WORDS = frozenset(_FILLER_TEXT.split())

_WORD_WEIGHT = 1.0
# Numbers, codes ("2024", "CC-4471") and negations decide the answer: one word of them
# more or less must not match, even in a long question.
_DECISIVE_WEIGHT = 2.0
_NEGATIONS = frozenset(
    {"not", "no", "nor", "never", "none", "neither", "without", "except", "cannot"}
)
_CONTRACTED_NOT = re.compile(r"n['’]t\b")
# Low: a mild reordering of the same words still matches (a heavy one may not).
_BIGRAM_WEIGHT = 0.2
_NGRAM_WEIGHT = 0.3
_NGRAM = 3


def normalized_words(text: str) -> list[str]:
    """Lower-cased, accent-free words of ``text``, filler words and plural ``s`` dropped."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    if not folded.isascii():  # only non-ASCII text has combining marks; skip the scan
        folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    # "don't" must count as a negation, not as the words "don" and "t".
    folded = _CONTRACTED_NOT.sub(" not", folded)
    return [_singular(w) for w in _WORD.findall(folded) if w not in FILLER_WORDS]


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@lru_cache(maxsize=65_536)
def _slot(feature: str, dimensions: int) -> tuple[int, float]:
    """Where a feature lands and with which sign. blake2b, not ``hash()``: Python's string
    hash is salted per process, and vectors must agree across replicas and restarts."""
    digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
    # The sign makes colliding features cancel on average instead of adding up.
    return digest % dimensions, 1.0 if digest >> 63 else -1.0


class HashingEmbeddingModel:
    """An :class:`~inferencing.contracts.EmbeddingModel` by feature hashing: word
    unigrams and bigrams and the character 3-grams of each word, hashed with a sign
    into ``dimensions`` slots and L2-normalised. Lexical, not semantic (see the module
    docstring): use it offline and in tests, and a real embedding model in production."""

    def __init__(self, *, dimensions: int = 512) -> None:
        if dimensions < 16:
            raise ValueError("dimensions must be at least 16")
        self._dimensions = dimensions

    @property
    def name(self) -> str:
        # Versioned: a change of features must not compare old vectors with new ones.
        return f"hashing-v1-{self._dimensions}"

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def embed(self, texts: Sequence[str], caller: InferenceCaller) -> EmbeddingResponse:
        # A few microseconds a text: cheaper than a hop to a worker thread.
        return EmbeddingResponse(tuple(self.vector(text) for text in texts), self.name, Usage(0, 0))

    def vector(self, text: str) -> tuple[float, ...]:
        """The unit vector of ``text``; all zeros when it has no words but fillers."""
        values = [0.0] * self._dimensions
        words = normalized_words(text)
        for word in words:
            if word in _NEGATIONS or any(ch.isdigit() for ch in word):
                self._add(values, "w:" + word, _DECISIVE_WEIGHT)
                continue
            self._add(values, "w:" + word, _WORD_WEIGHT)
            padded = f"<{word}>"
            for start in range(len(padded) - _NGRAM + 1):
                self._add(values, "c:" + padded[start : start + _NGRAM], _NGRAM_WEIGHT)
        for first, second in itertools.pairwise(words):
            self._add(values, f"b:{first} {second}", _BIGRAM_WEIGHT)
        norm = math.sqrt(math.fsum(v * v for v in values))
        if norm == 0.0:
            return tuple(values)
        return tuple(v / norm for v in values)

    def _add(self, values: list[float], feature: str, weight: float) -> None:
        slot, sign = _slot(feature, self._dimensions)
        values[slot] += sign * weight

    async def aclose(self) -> None:
        return None
