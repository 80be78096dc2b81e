"""Split parsed sections into overlapping word windows on natural boundaries.

A chunk never spans two sections, so it never crosses a page (PDF) or a
heading: its citation (page, section) is always exact. Sizes are counted in
words, a stand-in for tokens that needs no tokenizer (English prose averages
about 1.3 tokens a word); the knowledge layer stays free of any model's
vocabulary.

Tables (every line holding a ``|`` cell separator, as parsed from Markdown,
HTML and DOCX) are cut between rows only, and each piece of a table opens with
its header row, so a row read alone still says what its cells mean. A single
row longer than a chunk stays whole: it is the one case a chunk exceeds the size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from knowledge.ingestion.parsers import ParsedSection

_PARAGRAPHS = re.compile(r"\n\s*\n")
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by space.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")
# A Markdown header underline: | --- | :---: | (outer pipes optional).
_MARKDOWN_RULE = re.compile(r"^\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?$")


@dataclass(frozen=True, slots=True)
class TextChunk:
    """A piece of one section, with that section's page and heading."""

    text: str
    page: int | None
    section: str | None


@dataclass(frozen=True, slots=True)
class _Unit:
    """A paragraph, sentence or word window that fits in one chunk."""

    text: str
    words: int
    paragraph: int


def _words(text: str) -> int:
    return len(text.split())


def _is_table(paragraph: str) -> bool:
    lines = paragraph.split("\n")
    return len(lines) > 1 and all("|" in line for line in lines)


def _table_pieces(table: str, limit: int) -> list[str]:
    """Rows of ``table`` packed into pieces of at most ``limit`` words, each opening with
    the header (the first row, and a Markdown underline) unless it would fill half."""
    rows = table.split("\n")
    header_rows = 2 if len(rows) > 2 and _MARKDOWN_RULE.match(rows[1].strip()) else 1
    header, body = rows[:header_rows], rows[header_rows:]
    header_words = sum(_words(row) for row in header)
    repeated = header if header_words * 2 <= limit else []
    pieces: list[str] = []
    current, size = list(header), header_words
    for row in body:
        row_words = _words(row)
        if size + row_words > limit and len(current) > len(repeated):
            pieces.append("\n".join(current))
            current, size = list(repeated), sum(_words(line) for line in repeated)
        current.append(row)
        size += row_words
    pieces.append("\n".join(current))
    return pieces


def _units(text: str, limit: int) -> list[_Unit]:
    units: list[_Unit] = []
    number = 0
    for paragraph in _PARAGRAPHS.split(text):
        paragraph = paragraph.strip()
        words = _words(paragraph)
        if words == 0:
            continue
        number += 1
        if words <= limit:
            # Kept verbatim so list items and table rows keep their line breaks.
            units.append(_Unit(paragraph, words, number))
            continue
        if _is_table(paragraph):
            # Each piece of a table is a paragraph of its own: never cut, joined by a break.
            for piece in _table_pieces(paragraph, limit):
                units.append(_Unit(piece, _words(piece), number))
                number += 1
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            tokens = sentence.split()
            for start in range(0, len(tokens), limit):
                window = tokens[start : start + limit]
                if window:
                    units.append(_Unit(" ".join(window), len(window), number))
    return units


def _join(units: Iterable[_Unit]) -> str:
    text = ""
    previous: int | None = None
    for unit in units:
        if previous is not None:
            text += "\n\n" if unit.paragraph != previous else " "
        text += unit.text
        previous = unit.paragraph
    return text


def _overlap(units: Sequence[_Unit], budget: int) -> list[_Unit]:
    """The trailing whole units of ``units`` that fit within ``budget`` words."""
    tail: list[_Unit] = []
    used = 0
    for unit in reversed(units):
        if used + unit.words > budget:
            break
        tail.insert(0, unit)
        used += unit.words
    return tail


def split_section(text: str, *, chunk_words: int, overlap_words: int) -> list[str]:
    """Pack ``text`` into windows of at most ``chunk_words`` words.

    Windows break between paragraphs, else between sentences, else inside a
    sentence too long to fit. Consecutive windows share up to
    ``overlap_words`` words of whole units so that a fact cut at a boundary
    stays retrievable.
    """
    if chunk_words < 1:
        raise ValueError("chunk_words must be positive")
    chunks: list[list[_Unit]] = []
    current: list[_Unit] = []
    size = 0
    for unit in _units(text, chunk_words):
        if current and size + unit.words > chunk_words:
            chunks.append(current)
            # Each new window holds at least one unseen unit, so packing always advances.
            current = _overlap(current, min(overlap_words, chunk_words - unit.words))
            size = sum(kept.words for kept in current)
        current.append(unit)
        size += unit.words
    if current:
        chunks.append(current)
    return [_join(chunk) for chunk in chunks]


def chunk_sections(
    sections: Iterable[ParsedSection], *, chunk_words: int, overlap_words: int
) -> list[TextChunk]:
    """Chunk each section on its own, keeping its page and heading."""
    return [
        TextChunk(text=text, page=section.page, section=section.heading)
        for section in sections
        for text in split_section(
            section.text, chunk_words=chunk_words, overlap_words=overlap_words
        )
    ]
