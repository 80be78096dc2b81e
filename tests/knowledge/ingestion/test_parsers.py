from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from docx import Document

from knowledge.contracts import DocumentParseError
from knowledge.ingestion.parsers import (
    SUPPORTED_EXTENSIONS,
    ParsedDocument,
    ParsedSection,
    parse_document,
)
from tests.knowledge.factories import make_pdf

CORPUS = Path(__file__).resolve().parents[3] / "samples" / "corpus"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- text --------------------------------------------------------------------


def test_text_title_is_the_first_line_and_paragraphs_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "faq.txt", "Atlas FAQ\n\nQ: Retention?\r\nA:   400   days.\n\n\n\nEnd.")
    assert parse_document(path) == ParsedDocument(
        title="Atlas FAQ",
        sections=(ParsedSection(text="Atlas FAQ\n\nQ: Retention?\nA: 400 days.\n\nEnd."),),
    )


def test_text_in_a_legacy_encoding_is_read(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("Café prices: 5€".encode("cp1252"))
    assert parse_document(path).sections[0].text == "Café prices: 5€"


def test_a_binary_file_named_txt_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DocumentParseError, match="binary"):
        parse_document(path)


# --- markdown ----------------------------------------------------------------


def test_markdown_is_split_by_headings(tmp_path: Path) -> None:
    source = """Preamble before any heading.

# Leave Policy

Intro paragraph.

## Annual leave

You get **27 days**.

```sh
# not a heading, a shell comment
```

Carry-over
----------

- five days
- until 31 March
"""
    document = parse_document(write(tmp_path / "leave.md", source))

    assert document.title == "Leave Policy"
    assert [(s.heading, s.page) for s in document.sections] == [
        (None, None),
        ("Leave Policy", None),
        ("Annual leave", None),
        ("Carry-over", None),
    ]
    assert "# not a heading" in document.sections[2].text
    assert document.sections[3].text == "- five days\n- until 31 March"


def test_markdown_front_matter_gives_the_title_and_is_not_text(tmp_path: Path) -> None:
    source = "---\ntitle: Expenses\nowner: finance\n---\n\n## Meals\n\n60 USD a day.\n"
    document = parse_document(write(tmp_path / "x.md", source))
    assert document.title == "Expenses"
    assert document.sections == (ParsedSection(text="60 USD a day.", heading="Meals"),)


def test_markdown_without_headings_is_titled_by_file_name(tmp_path: Path) -> None:
    document = parse_document(write(tmp_path / "team-notes.md", "Just *text*."))
    assert document.title == "team notes"
    assert document.sections == (ParsedSection(text="Just *text*."),)


# --- HTML --------------------------------------------------------------------


def test_html_keeps_content_and_drops_scripts_styles_and_navigation(tmp_path: Path) -> None:
    source = """<!DOCTYPE html><html><head><title>Runbook DB-7</title>
    <style>body { color: red }</style><script>track("secret-script")</script></head>
    <body><nav><a href="/">Home</a> | <a href="/x">Menu item</a></nav>
    <h1>Failover</h1><p>Run the   <code>failover</code> command
    from the <a href="/jump">jump host</a>.</p>
    <h2>Before</h2><ul><li>Check lag</li><li>Set read-only</li></ul>
    <h4>Detail</h4><p>Still in Before.<br>Second line.</p>
    <h3>After</h3><table><tr><td>Owner</td><td>Platform</td></tr></table>
    <noscript>Enable JavaScript</noscript></body></html>"""
    document = parse_document(write(tmp_path / "db7.html", source))

    assert document.title == "Runbook DB-7"
    assert [s.heading for s in document.sections] == ["Failover", "Before", "After"]
    assert document.sections[0].text == "Run the failover command from the jump host."
    assert document.sections[1].text == (
        "Check lag\n\nSet read-only\n\nDetail\n\nStill in Before.\nSecond line."
    )
    assert document.sections[2].text == "Owner | Platform"
    everything = " ".join(s.text for s in document.sections)
    for dropped in ("secret-script", "color", "Menu item", "Enable JavaScript"):
        assert dropped not in everything


def test_html_tables_become_one_row_per_line_with_nested_tables_once(tmp_path: Path) -> None:
    source = """<h1>Budget</h1><p>Before.</p><table>
    <tr><th>Region</th><th>Owner</th></tr>
    <tr><td>North <b>east</b></td><td><table><tr><td>Kim</td></tr></table></td></tr>
    <tr><td></td><td></td></tr>
    <tr><td>South</td><td>Sam</td></tr></table><p>After.</p>"""
    document = parse_document(write(tmp_path / "budget.html", source))

    (section,) = document.sections
    assert section.text == "Before.\n\nRegion | Owner\nNorth east | Kim\nSouth | Sam\n\nAfter."


def test_html_without_title_uses_its_first_heading(tmp_path: Path) -> None:
    document = parse_document(write(tmp_path / "a.htm", "<h2>On-call</h2><p>Page me.</p>"))
    assert document.title == "On-call"


# --- PDF ---------------------------------------------------------------------


def test_pdf_has_one_section_per_page_numbered_from_one(tmp_path: Path) -> None:
    path = make_pdf(
        tmp_path / "guide.pdf",
        [["Atlas guide", "Press Ctrl+K."], [], ["Alerts snooze for 72 hours."]],
        title="Atlas 3.8 User Guide",
    )
    document = parse_document(path)

    assert document.title == "Atlas 3.8 User Guide"
    assert [(s.page, s.heading) for s in document.sections] == [(1, None), (3, None)]
    assert "Press Ctrl+K." in document.sections[0].text
    assert "72 hours" in document.sections[1].text


def test_pdf_without_metadata_title_uses_its_first_line(tmp_path: Path) -> None:
    document = parse_document(make_pdf(tmp_path / "memo.pdf", [["Quarterly memo", "Body."]]))
    assert document.title == "Quarterly memo"


def test_pdf_with_a_user_password_is_refused(tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "locked.pdf", [["secret"]], password="pw")
    with pytest.raises(DocumentParseError, match="encrypted"):
        parse_document(path)


@pytest.mark.parametrize(
    "content",
    [b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage", b"not a pdf at all", b""],
    ids=["damaged", "garbage", "empty"],
)
def test_a_corrupt_pdf_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(content)
    with pytest.raises(DocumentParseError, match=r"broken\.pdf"):
        parse_document(path)


def test_a_pdf_without_text_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DocumentParseError, match="no extractable text"):
        parse_document(make_pdf(tmp_path / "scan.pdf", [[]]))


# --- DOCX --------------------------------------------------------------------


def test_docx_sections_follow_heading_styles_and_tables_are_kept(tmp_path: Path) -> None:
    document = Document()
    document.add_paragraph("Falcon Budget", style="Title")
    document.add_paragraph("To: the CEO")
    document.add_heading("Summary", level=1)
    document.add_paragraph("Budget is USD 4.85 million.")
    document.add_heading("Breakdown", level=2)
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Line", "USD"
    table.cell(1, 0).text, table.cell(1, 1).text = "Personnel", "2,310,000"
    path = tmp_path / "memo.docx"
    document.save(str(path))

    parsed = parse_document(path)

    assert parsed.title == "Falcon Budget"
    assert parsed.sections == (
        ParsedSection(text="To: the CEO"),
        ParsedSection(text="Budget is USD 4.85 million.", heading="Summary"),
        ParsedSection(text="Line | USD\nPersonnel | 2,310,000", heading="Breakdown"),
    )


def test_docx_core_title_wins(tmp_path: Path) -> None:
    document = Document()
    document.core_properties.title = "Official title"
    document.add_paragraph("Body text.")
    document.save(str(tmp_path / "t.docx"))
    assert parse_document(tmp_path / "t.docx").title == "Official title"


def test_a_corrupt_docx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.docx"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DocumentParseError, match=r"broken\.docx: not a readable DOCX"):
        parse_document(path)


def test_a_zip_that_is_not_a_docx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(DocumentParseError, match="not a readable DOCX"):
        parse_document(path)


# --- everything else ---------------------------------------------------------


@pytest.mark.parametrize("name", ["sheet.xlsx", "logo.png", "Makefile"])
def test_unsupported_types_are_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "data")
    with pytest.raises(DocumentParseError, match="unsupported file type"):
        parse_document(path)


@pytest.mark.parametrize("suffix", [".txt", ".md", ".html"])
def test_empty_documents_are_refused(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"empty{suffix}", "  \n\n ")
    with pytest.raises(DocumentParseError, match="no extractable text"):
        parse_document(path)


def test_a_missing_file_is_a_parse_error(tmp_path: Path) -> None:
    with pytest.raises(DocumentParseError, match="cannot read"):
        parse_document(tmp_path / "gone.md")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CORPUS.rglob("*") if p.suffix in SUPPORTED_EXTENSIONS and p.is_file()),
    ids=lambda p: p.relative_to(CORPUS).as_posix(),
)
def test_every_sample_document_parses_into_substantial_text(path: Path) -> None:
    document = parse_document(path)
    words = sum(len(section.text.split()) for section in document.sections)
    assert document.title
    if path.name != "README.md":
        assert 300 <= words <= 1500
