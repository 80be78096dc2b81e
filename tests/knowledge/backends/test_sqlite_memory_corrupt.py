"""What the embedded index reads of FTS5's own structures fails closed when it is not
as FTS5 writes it.

Document sizes (``%_docsize`` varints) and term postings (the ``fts5vocab`` instance
table) feed the in-memory BM25. Read wrongly, they would not expose a forbidden chunk
(the ACL is applied separately) but would silently rank the permitted ones by wrong
numbers; a ``ValueError`` here makes the search fail with ``IndexUnavailable`` instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from knowledge.backends.sqlite_memory import (
    IndexRows,
    RowData,
    document_lengths,
    postings_from_vocabulary,
)


def _rows(*row_ids: int) -> IndexRows:
    return IndexRows.build(1, 0, [RowData(row_id, "", 3, None) for row_id in row_ids])


def test_a_varint_running_on_into_the_next_rows_sizes_is_refused() -> None:
    # 0x81 opens a two-byte varint that the first row never finishes; read naively, it
    # would take the second row's first byte and give the first row 128 + 5 tokens.
    with pytest.raises(ValueError, match="inside a varint"):
        document_lengths([bytes([3, 0x81]), bytes([5, 2])])


def test_well_formed_sizes_still_decode() -> None:
    assert document_lengths([bytes([3, 0x81, 0x00]), b"", bytes([5, 2])]).tolist() == [131, 0, 7]


def test_postings_out_of_row_order_are_refused() -> None:
    rows = _rows(1, 2, 3)
    # In order, each row's occurrences are summed once.
    postings = postings_from_vocabulary(rows, "1 1 3", "212")
    assert postings.rows.tolist() == [0, 2]
    assert np.allclose(postings.frequency, [1.5, 1.0])
    # Out of order, row 1 would count as two rows (two hits, each with part of its weight).
    with pytest.raises(ValueError, match="ascending"):
        postings_from_vocabulary(rows, "1 3 1", "212")


def test_postings_naming_a_row_past_the_last_are_refused() -> None:
    rows = _rows(1, 2, 3)
    with pytest.raises(ValueError, match="does not hold"):
        rows.positions(np.array([9, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="does not hold"):
        postings_from_vocabulary(rows, "2 9", "22")
