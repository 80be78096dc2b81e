"""How hybrid search merges its two permitted lists, BM25 and vector, into one ranking.

Two methods, both over lists that the ACL has already trimmed (fusion never sees a
chunk the caller may not read):

- ``score`` (the default): a convex combination of standardised scores,
  ``share · z(cosine) + (1 − share) · z(bm25)``. Each list's scores are standardised
  with the mean and standard deviation of its best :data:`SCORE_WINDOW` entries, so the
  scale does not move with the fusion depth (``top_k``). A chunk missing from a list
  scores there as what the list says of it: for a text list that holds every match,
  BM25 0 (it matches no query term); otherwise the list's last score (it scored at most
  that). Unlike rank fusion, this keeps *how much* better the first hit is than the
  tenth: on known-item search over manual pages it beat Reciprocal Rank Fusion on
  held-out queries (``bench/retrieval_fusion.py``, docs/knowledge.md).
- ``rrf``: Reciprocal Rank Fusion, ``Σ 1 / (RRF_K + rank)``; needs no scores, and is
  what Azure AI Search does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

RRF_K = 60
"""Reciprocal Rank Fusion constant: a passage scores sum(1 / (RRF_K + rank))."""

SCORE_WINDOW = 50
"""Entries of each list whose scores set its mean and standard deviation."""

Ranked = Sequence[tuple[int, float]]
"""``(row, score)``, best first (higher scores are better)."""

FusionMethod = Literal["score", "rrf"]


@dataclass(frozen=True, slots=True)
class HybridFusion:
    """How a hybrid search fuses its lists."""

    method: FusionMethod = "score"
    vector_share: float = 0.6
    """Weight of the vector list in ``score`` fusion (0 to 1); the text list has the rest."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.vector_share <= 1.0:
            raise ValueError("vector_share must be between 0 and 1")


def fuse(
    text: Ranked, vector: Ranked, fusion: HybridFusion, *, text_complete: bool
) -> list[tuple[int, float]]:
    """One ranking of the rows of ``text`` and ``vector``, best first; equal scores by
    ascending row. ``text_complete``: ``text`` holds every permitted match of the
    query's terms (it was not cut at the fusion depth)."""
    if fusion.method == "rrf":
        return reciprocal_rank_fusion([row for row, _ in text], [row for row, _ in vector])
    return score_fusion(text, vector, fusion.vector_share, text_complete=text_complete)


def reciprocal_rank_fusion(*ranked: Sequence[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal Rank Fusion of lists of rows, best first; equal scores by ascending row."""
    scores: dict[int, float] = {}
    for rows in ranked:
        for rank, row in enumerate(rows, start=1):
            scores[row] = scores.get(row, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def score_fusion(
    text: Ranked, vector: Ranked, vector_share: float, *, text_complete: bool
) -> list[tuple[int, float]]:
    """``vector_share · z(vector) + (1 − vector_share) · z(text)`` over the union of both
    lists (see the module docstring for z and for missing rows)."""
    text_z, text_missing = _standardised(text, 0.0 if text_complete else None)
    vector_z, vector_missing = _standardised(vector, None)
    fused: dict[int, float] = {}
    for row in text_z.keys() | vector_z.keys():
        fused[row] = vector_share * vector_z.get(row, vector_missing) + (
            1.0 - vector_share
        ) * text_z.get(row, text_missing)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def _standardised(ranked: Ranked, absent: float | None) -> tuple[dict[int, float], float]:
    """Each row's z-score, and that of a row missing from the list (whose raw score is
    ``absent``, or at most the list's last when ``None``)."""
    if not ranked:
        return {}, 0.0
    window = [score for _, score in ranked[:SCORE_WINDOW]]
    mean = math.fsum(window) / len(window)
    spread = math.sqrt(math.fsum((s - mean) ** 2 for s in window) / len(window))
    if spread <= 1e-12:
        # One score (or all equal): measure distances in units of its size instead.
        spread = abs(mean) or 1.0
    missing = ranked[-1][1] if absent is None else min(absent, ranked[-1][1])
    return {row: (score - mean) / spread for row, score in ranked}, (missing - mean) / spread
