from __future__ import annotations

import itertools

import pytest

from knowledge.ingestion.chunking import TextChunk, chunk_sections, split_section
from knowledge.ingestion.parsers import ParsedSection


def sentences(count: int, words: int = 10, tag: str = "s") -> list[str]:
    """Distinct sentences of ``words`` words each, e.g. 's3w0 s3w1 ... s3w9.'."""
    return [" ".join(f"{tag}{n}w{k}" for k in range(words)) + "." for n in range(count)]


def word_count(text: str) -> int:
    return len(text.split())


def test_a_short_section_is_one_chunk_kept_verbatim() -> None:
    text = "Title line\n- item one\n- item two"
    assert split_section(text, chunk_words=50, overlap_words=10) == [text]


def test_chunks_break_between_paragraphs() -> None:
    first = " ".join(sentences(6, tag="a"))  # 60 words
    second = " ".join(sentences(6, tag="b"))
    chunks = split_section(f"{first}\n\n{second}", chunk_words=100, overlap_words=30)
    # A whole 60-word paragraph does not fit a 30-word overlap, so none is repeated.
    assert chunks == [first, second]


def test_small_paragraphs_are_packed_together() -> None:
    paragraphs = [" ".join(sentences(1, tag=f"p{n}")) for n in range(5)]  # 10 words each
    chunks = split_section("\n\n".join(paragraphs), chunk_words=25, overlap_words=0)
    assert chunks == [
        f"{paragraphs[0]}\n\n{paragraphs[1]}",
        f"{paragraphs[2]}\n\n{paragraphs[3]}",
        paragraphs[4],
    ]


def test_a_long_paragraph_breaks_between_sentences_with_overlap() -> None:
    parts = sentences(25)  # one paragraph of 250 words
    chunks = split_section(" ".join(parts), chunk_words=50, overlap_words=10)

    assert all(word_count(chunk) <= 50 for chunk in chunks)
    assert all(chunk.endswith(".") and chunk.split()[0].endswith("w0") for chunk in chunks)
    for previous, current in itertools.pairwise(chunks):
        # The last sentence of a chunk (10 words, within the overlap) opens the next one.
        assert current.startswith(previous.split(". ")[-1])
    covered = " ".join(chunks)
    assert all(sentence in covered for sentence in parts)


def test_a_sentence_longer_than_a_chunk_is_cut_into_windows() -> None:
    words = [f"w{n}" for n in range(95)]
    chunks = split_section(" ".join(words), chunk_words=40, overlap_words=0)
    assert chunks == [" ".join(words[:40]), " ".join(words[40:80]), " ".join(words[80:])]


def test_an_overlap_larger_than_the_chunk_still_makes_progress() -> None:
    chunks = split_section(" ".join(sentences(20, words=5)), chunk_words=10, overlap_words=500)
    assert all(word_count(chunk) <= 10 for chunk in chunks)
    assert chunks[-1].endswith("s19w4.")
    assert len(chunks) == 19  # each window adds exactly one new 5-word sentence


def test_chunk_words_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_words"):
        split_section("text", chunk_words=0, overlap_words=0)


def test_chunks_never_cross_a_section_and_keep_page_and_heading() -> None:
    sections = [
        ParsedSection(text=" ".join(sentences(8, tag="p1")), page=1),
        ParsedSection(text=" ".join(sentences(3, tag="p2")), page=2),
        ParsedSection(text="Short.", heading="Appendix"),
    ]
    chunks = chunk_sections(sections, chunk_words=50, overlap_words=10)

    assert [(c.page, c.section) for c in chunks] == [
        (1, None),
        (1, None),
        (2, None),
        (None, "Appendix"),
    ]
    assert all("p2" not in c.text for c in chunks[:2])
    assert all("p1" not in c.text for c in chunks[2:])
    assert chunks[2] == TextChunk(text=" ".join(sentences(3, tag="p2")), page=2, section=None)


def test_empty_sections_make_no_chunks() -> None:
    assert chunk_sections([ParsedSection(text="  \n\n ")], chunk_words=50, overlap_words=5) == []


def markdown_table(rows: int) -> str:
    lines = ["| Region | Owner | Budget |", "| --- | :---: | ---: |"]
    lines += [f"| region{n} north | owner{n} team | {n}000 EUR |" for n in range(rows)]
    return "\n".join(lines)


def test_a_long_markdown_table_is_cut_between_rows_and_repeats_its_header() -> None:
    table = markdown_table(30)  # 5 header words + 30 rows of 7 words
    chunks = split_section(f"Budgets by region.\n\n{table}", chunk_words=40, overlap_words=0)

    assert all(word_count(chunk) <= 40 for chunk in chunks)
    # The prose may share a chunk with the first rows; the table's pieces are paragraphs.
    pieces = [part for chunk in chunks for part in chunk.split("\n\n") if "|" in part]
    assert len(pieces) > 3
    rows_seen: list[str] = []
    for piece in pieces:
        lines = piece.split("\n")
        assert lines[:2] == ["| Region | Owner | Budget |", "| --- | :---: | ---: |"]
        assert all(line.startswith("| region") and line.endswith("EUR |") for line in lines[2:])
        rows_seen += lines[2:]
    assert rows_seen == table.split("\n")[2:]  # every row once, whole, in order


def test_a_pipe_separated_table_from_docx_or_html_keeps_rows_whole() -> None:
    rows = ["Quarter | Revenue | Cost"] + [f"Q{n} 2024 | {n}1 M | {n}2 M" for n in range(20)]
    chunks = split_section("\n".join(rows), chunk_words=30, overlap_words=10)

    for chunk in chunks:
        lines = chunk.split("\n")
        assert lines[0] == "Quarter | Revenue | Cost"
        assert all(line in rows for line in lines)
    assert {line for chunk in chunks for line in chunk.split("\n")} == set(rows)


def test_a_row_longer_than_a_chunk_stays_whole() -> None:
    long_row = "| " + " ".join(f"w{n}" for n in range(60)) + " |"
    table = "\n".join(["| A | B |", "| - | - |", "| a | b |", long_row, "| c | d |"])
    chunks = split_section(table, chunk_words=20, overlap_words=0)

    assert any(long_row in chunk for chunk in chunks)
    assert all(
        line.startswith("|") and line.endswith("|") for c in chunks for line in c.split("\n")
    )


def test_prose_with_pipes_in_only_some_lines_is_not_a_table() -> None:
    text = "Use a | b to pipe.\n" + " ".join(sentences(10))
    chunks = split_section(text, chunk_words=30, overlap_words=0)
    assert all(word_count(chunk) <= 30 for chunk in chunks)
