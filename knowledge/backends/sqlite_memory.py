"""The in-memory side of the embedded index: one write generation's rows, held as arrays.

:class:`IndexRows` holds, per chunk (``chunks.id`` ascending), its ACL tokens as
token → rows postings, its FTS5 document length, and its vector. Text search ranks
with :func:`bm25`, a numpy transcription of FTS5's ``bm25()``: FTS5's own ranking
calls the auxiliary function once per matching row (a B-tree look-up of the row's size
and a walk of every phrase's positions), which at 100k chunks and a query whose words
match half of them costs tens of milliseconds. Here the same sums are a few array
operations over each query term's postings, read from FTS5's index once per write
generation and term (:class:`TermPostings`). The scores are the same numbers, computed
in the same order with the same constants: a test compares them with ``bm25()``.

The permitted rows come first and only they are ranked, so the ACL stays a
pre-filter; the privileged count of matches the ACL removed falls out of the same
arrays (matching rows in the tenant minus matching permitted rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]
Rows = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]

# FTS5's bm25() constants (fts5_aux.c).
_K1 = 1.2
_B = 0.75


@dataclass(frozen=True, slots=True)
class TermPostings:
    """One query phrase of a single token: the rows it occurs in (within the searched
    columns) and its column-weighted frequency in each."""

    rows: Rows
    """Positions in :attr:`IndexRows.row_ids`, ascending."""
    frequency: Floats


@dataclass(frozen=True, slots=True)
class RowData:
    """What a write adds for one chunk: enough to extend :class:`IndexRows` in place of a
    reload."""

    row_id: int
    acl: str
    length: int
    vector: bytes | None


@dataclass(frozen=True, slots=True)
class IndexRows:
    """Every chunk of one write generation, as arrays."""

    generation: int
    row_ids: Rows
    """``chunks.id`` of each position, ascending."""
    lengths: Rows
    """Tokens per row over all FTS5 columns: bm25()'s document length."""
    postings: Mapping[str, Rows]
    """ACL token → positions that token may read (the tenant token: the tenant's rows)."""
    dimensions: int
    """Of :attr:`matrix`; 0 when the index holds no vectors."""
    matrix: Matrix
    """One vector per position; zeros where the chunk has none (see :attr:`has_vector`)."""
    has_vector: Mask

    @classmethod
    def build(cls, generation: int, dimensions: int, rows: Sequence[RowData]) -> IndexRows:
        empty = cls(
            generation,
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            {},
            dimensions,
            np.zeros((0, dimensions), dtype=np.float32),
            np.zeros(0, dtype=np.bool_),
        )
        return empty.changed(generation, np.zeros(0, dtype=np.int64), rows)

    def changed(self, generation: int, removed: Rows, added: Sequence[RowData]) -> IndexRows:
        """These rows less ``removed`` (``chunks.id``), plus ``added``. SQLite gives a new
        row a larger id than every remaining one, so positions stay in id order; a
        ``ValueError`` says they would not (the caller then reloads)."""
        keep = ~np.isin(self.row_ids, removed)
        kept = self.row_ids[keep]
        new_ids = np.fromiter((row.row_id for row in added), dtype=np.int64, count=len(added))
        if new_ids.size and (
            np.any(np.diff(new_ids) <= 0) or (kept.size and new_ids[0] <= kept[-1])
        ):
            raise ValueError("new rows do not follow the kept ones in id order")
        # Old position → new position, for the postings of kept rows.
        moved = np.cumsum(keep, dtype=np.int64) - 1
        postings: dict[str, list[Rows]] = {}
        for token, rows in self.postings.items():
            still = rows[keep[rows]]
            if still.size:
                postings[token] = [moved[still]]
        extra: dict[str, list[int]] = {}
        for offset, row in enumerate(added, start=kept.size):
            for token in row.acl.split():
                extra.setdefault(token, []).append(offset)
        for token, positions in extra.items():
            postings.setdefault(token, []).append(np.asarray(positions, dtype=np.int64))
        vectors = np.zeros((len(added), self.dimensions), dtype=np.float32)
        with_vector = np.zeros(len(added), dtype=np.bool_)
        for i, row in enumerate(added):
            if row.vector is not None:
                vector = np.frombuffer(row.vector, dtype="<f4")
                if vector.size != self.dimensions:
                    raise ValueError("a vector does not have the index's dimensions")
                vectors[i] = vector
                with_vector[i] = True
        lengths = np.fromiter((row.length for row in added), dtype=np.int64, count=len(added))
        return IndexRows(
            generation,
            np.concatenate([kept, new_ids]),
            np.concatenate([self.lengths[keep], lengths]),
            {token: np.concatenate(parts) for token, parts in postings.items()},
            self.dimensions,
            np.concatenate([self.matrix[keep], vectors]) if len(added) else self.matrix[keep],
            np.concatenate([self.has_vector[keep], with_vector]),
        )

    def mask(self, tokens: Sequence[str]) -> Mask:
        """Rows any of ``tokens`` may read."""
        mask = np.zeros(len(self.row_ids), dtype=np.bool_)
        for token in tokens:
            rows = self.postings.get(token)
            if rows is not None:
                mask[rows] = True
        return mask

    def positions(self, row_ids: Rows) -> Rows:
        """Positions of ``row_ids`` (which must all be rows of this generation)."""
        positions = np.searchsorted(self.row_ids, row_ids)
        if positions.size and (
            np.any(positions >= len(self.row_ids))
            or not np.array_equal(self.row_ids[positions], row_ids)
        ):
            raise ValueError("the postings name rows this generation does not hold")
        return positions.astype(np.int64)

    def nearest(self, query: Matrix, rows: Rows, depth: int) -> list[tuple[int, float]]:
        """``(chunks.id, cosine)`` of the ``depth`` rows of ``rows`` nearest ``query``."""
        if rows.size == 0:
            return []
        # Gathering a few rows beats a full product; for most rows, multiply all and select.
        if rows.size * 4 < len(self.row_ids):
            scores = self.matrix[rows] @ query
        else:
            scores = (self.matrix @ query)[rows]
        return _best(self.row_ids[rows], scores.astype(np.float64), depth)

    def bm25(
        self, phrases: Sequence[TermPostings], permitted: Mask, tenant: Mask, depth: int
    ) -> tuple[list[tuple[int, float]], int]:
        """The ``depth`` best permitted rows matching any phrase, as ``(chunks.id, score)``
        with FTS5's bm25() score negated (higher is better), and how many rows in the
        tenant matched but are not permitted.

        ``score = Σ idf · f·(k1+1) / (f + k1·(1 − b + b·D/avgdl))`` over the phrases, with
        FTS5's idf (``log((N − n + 0.5)/(n + 0.5))``, at least 1e-6), ``f`` the phrase's
        column-weighted frequency in the row and ``D`` the row's length in tokens."""
        count = len(self.row_ids)
        if count == 0 or not phrases:
            return [], 0
        average = float(int(self.lengths.sum())) / float(count)
        lengths = self.lengths.astype(np.float64)
        scores = np.zeros(count, dtype=np.float64)
        matched = np.zeros(count, dtype=np.bool_)
        for phrase in phrases:
            if phrase.rows.size == 0:
                continue
            hits = float(phrase.rows.size)
            idf = math.log((count - hits + 0.5) / (hits + 0.5))
            if idf <= 0.0:
                idf = 1e-6
            f = phrase.frequency
            d = lengths[phrase.rows]
            # The operations and their order are FTS5's, so the doubles come out equal.
            scores[phrase.rows] += idf * (
                (f * (_K1 + 1.0)) / (f + _K1 * (1 - _B + _B * d / average))
            )
            matched[phrase.rows] = True
        candidates = np.flatnonzero(matched & permitted)
        trimmed = int(np.count_nonzero(matched & tenant)) - int(
            np.count_nonzero(matched & tenant & permitted)
        )
        return _best(self.row_ids[candidates], scores[candidates], depth), trimmed


def _best(row_ids: Rows, scores: Floats, depth: int) -> list[tuple[int, float]]:
    """The ``depth`` highest scores, best first; equal scores by ascending row id."""
    if row_ids.size == 0 or depth < 1:
        return []
    if depth < row_ids.size:
        # Everything scoring at least the depth-th best, so ties at the cut stay decidable.
        cut = np.partition(scores, row_ids.size - depth)[row_ids.size - depth]
        keep = np.flatnonzero(scores >= cut)
        row_ids, scores = row_ids[keep], scores[keep]
    order = np.lexsort((row_ids, -scores))[:depth]
    return [(int(row_ids[i]), float(scores[i])) for i in order]


def postings_from_vocabulary(
    rows: IndexRows, documents: str | None, weights: str | None
) -> TermPostings:
    """A phrase's postings from FTS5's instance vocabulary, as two strings: the rows'
    ``chunks.id`` of every occurrence (space separated, ascending) and, per occurrence,
    its column's weight in halves (one digit each: 2 for text, 1 for title and section)."""
    if not documents or not weights:
        return TermPostings(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
    ids = np.fromstring(documents, dtype=np.int64, sep=" ")
    halves = np.frombuffer(weights.encode("ascii"), dtype=np.uint8).astype(np.float64) - 48.0
    if ids.size != halves.size:
        raise ValueError("the vocabulary's columns disagree")
    # Out of order, a row would be counted twice (its hits and frequency wrong): refuse.
    if np.any(np.diff(ids) < 0):
        raise ValueError("the vocabulary's rows are not in ascending order")
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    # Sums of halves are exact in binary floating point, whatever the order.
    frequency = np.add.reduceat(halves, starts) * 0.5
    return TermPostings(rows.positions(ids[starts]), frequency)


def document_lengths(sizes: Sequence[bytes]) -> Rows:
    """Total tokens per row from FTS5's ``%_docsize`` blobs: one SQLite varint per column
    (big-endian groups of seven bits, the high bit set on every byte but the last)."""
    lengths = np.zeros(len(sizes), dtype=np.int64)
    data = np.frombuffer(b"".join(sizes), dtype=np.uint8)
    if data.size == 0:
        return lengths
    counts = np.fromiter((len(size) for size in sizes), dtype=np.int64, count=len(sizes))
    owner = np.repeat(np.arange(len(sizes)), counts)
    last = (data & 0x80) == 0
    # Column sizes stay far below 2**28, so four bytes per varint never overflow this.
    values = np.zeros(data.size, dtype=np.int64)
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    if np.any(ends - starts >= 4) or not last[-1]:
        raise ValueError("an FTS5 document size is not a short varint")
    # Each row's blob ends a varint: else one would run on into the next row's sizes.
    if not np.all(last[(np.cumsum(counts) - 1)[counts > 0]]):
        raise ValueError("an FTS5 document size ends inside a varint")
    low = (data & 0x7F).astype(np.int64)
    for shift in range(4):
        # Byte ``end - shift`` of each varint carries bits 7*shift and up.
        index = ends - shift
        valid = index >= starts
        values[ends[valid]] += low[index[valid]] << (7 * shift)
    np.add.at(lengths, owner[ends], values[ends])
    return lengths
