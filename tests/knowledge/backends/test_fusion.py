"""Fusion of hybrid search's BM25 and vector lists (``knowledge.backends.fusion``).

These pin the behaviour that makes score fusion different from rank fusion: a clear
lead in one list survives a near tie in the other, and a chunk that alone matches the
query's words (a complete text list) is lifted. Each case is chosen so that a swap of
the two methods, a dropped weight or a wrong value for missing rows changes the order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.backends.fusion import (
    RRF_K,
    HybridFusion,
    fuse,
    reciprocal_rank_fusion,
    score_fusion,
)
from knowledge.backends.sqlite import SqliteKnowledgeIndex
from knowledge.contracts import EmbeddingIdentity, SearchMode, SearchRequest
from tests.knowledge.factories import access, caller_filter, make_chunks

# Row 1 leads the vector list by far; row 2 leads the text list by a hair over row 1's
# third place. Ranks alone favour row 2; scores favour row 1.
VECTOR = [(1, 0.90), (2, 0.60), (3, 0.59), (4, 0.58), (5, 0.57)]
TEXT = [(2, 8.10), (3, 8.05), (1, 8.00), (4, 2.00)]


def test_rank_fusion_sums_reciprocal_ranks_and_breaks_ties_by_row() -> None:
    fused = dict(reciprocal_rank_fusion([1, 2], [2, 3]))
    assert fused == pytest.approx(
        {1: 1 / (RRF_K + 1), 2: 1 / (RRF_K + 2) + 1 / (RRF_K + 1), 3: 1 / (RRF_K + 2)}
    )
    # Rows 5 and 4 tie: the lower row comes first, whatever the input order.
    assert [row for row, _ in reciprocal_rank_fusion([5], [4])] == [4, 5]


def test_rank_fusion_follows_ranks_where_score_fusion_follows_margins() -> None:
    by_rank = fuse(TEXT, VECTOR, HybridFusion("rrf"), text_complete=True)
    by_score = fuse(TEXT, VECTOR, HybridFusion("score", 0.75), text_complete=True)
    assert by_rank[0][0] == 2
    assert by_score[0][0] == 1
    assert {row for row, _ in by_score} == {1, 2, 3, 4, 5}


def test_the_vector_share_weighs_the_lists() -> None:
    only_vector = score_fusion(TEXT, VECTOR, 1.0, text_complete=True)
    only_text = score_fusion(TEXT, VECTOR, 0.0, text_complete=True)
    assert [row for row, _ in only_vector] == [1, 2, 3, 4, 5]
    # Row 5 matches no term of a complete text list: BM25 0, below row 4's 2.0.
    assert [row for row, _ in only_text] == [2, 3, 1, 4, 5]


def test_the_only_chunk_matching_the_words_is_lifted_when_the_text_list_is_complete() -> None:
    vector = [(10, 0.80), (11, 0.79), (12, 0.50), (13, 0.49)]
    text = [(11, 3.0)]
    # Complete: every other chunk has BM25 0, so row 11's match counts.
    assert score_fusion(text, vector, 0.75, text_complete=True)[0][0] == 11
    # Cut at the depth: the others may score up to 3.0 too, so the match tells nothing.
    assert score_fusion(text, vector, 0.75, text_complete=False)[0][0] == 10


def test_a_chunk_missing_from_the_vector_list_scores_as_its_last() -> None:
    # Row 20 is the best text match but has no vector among the vector list's rows.
    fused = dict(
        score_fusion([(20, 5.0), (21, 1.0)], [(21, 0.9), (22, 0.1)], 0.5, text_complete=True)
    )
    assert fused[20] > fused[22]
    assert fused[21] > fused[22]


def test_empty_lists_fuse_to_the_other_list() -> None:
    assert [row for row, _ in score_fusion([], VECTOR, 0.75, text_complete=True)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert [row for row, _ in score_fusion(TEXT, [], 0.75, text_complete=False)] == [2, 3, 1, 4]
    assert score_fusion([], [], 0.75, text_complete=True) == []


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="vector_share"):
        HybridFusion("score", share)


# The index passes its configured fusion through. Three chunks mention "invoice" once,
# at slightly different lengths (BM25: a, c, b); b's vector is far nearest the query's.
# Ranks favour a (first and second); scores favour b (a clear vector lead).
_IDENTITY = EmbeddingIdentity("test-2d", 2)
_FILLER = "travel expenses are refunded monthly"
_DOCUMENTS = {
    "a": ("invoice " + _FILLER, (0.60, 0.80)),
    "c": ("invoice " + _FILLER + " by finance", (0.59, 0.81)),
    "b": ("invoice " + _FILLER + " by the finance team", (1.0, 0.0)),
    "d": ("holiday rules", (0.58, 0.81)),
    "e": ("parking rules", (0.57, 0.82)),
}


@pytest.mark.parametrize(("fusion", "first"), [(HybridFusion("rrf"), "a"), (HybridFusion(), "b")])
async def test_the_sqlite_index_fuses_hybrid_lists_as_configured(
    tmp_path: Path, fusion: HybridFusion, first: str
) -> None:
    index = SqliteKnowledgeIndex(tmp_path / "knowledge.db", fusion=fusion)
    await index.open()
    try:
        for name, (text, vector) in _DOCUMENTS.items():
            await index.replace_document(
                name,
                make_chunks(name, text, acl=access(public=True)),
                content_hash=name,
                vectors=[vector],
                embedding=_IDENTITY,
            )
        reader = caller_filter("contoso", "reader@contoso.com")
        text_order = await index.search(SearchRequest("invoice", 5, SearchMode.TEXT), reader)
        assert [p.chunk.document_id for p in text_order.passages] == ["a", "c", "b"]
        hits = await index.search(
            SearchRequest("invoice", 5, SearchMode.HYBRID, (1.0, 0.0), _IDENTITY), reader
        )
    finally:
        await index.close()
    assert hits.passages[0].chunk.document_id == first
    assert {p.chunk.document_id for p in hits.passages} == set(_DOCUMENTS)
