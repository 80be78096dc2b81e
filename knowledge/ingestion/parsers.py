"""Turn a source file into a typed :class:`ParsedDocument` of titled, paged sections.

Parsing is blocking (file I/O and CPU-bound third-party parsers): call
:func:`parse_document` from a worker thread, never on the event loop. The
BeautifulSoup, pypdf and python-docx imports are deferred to first use: together
they cost about 300 ms, which service start-up should not pay.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import yaml
from markdown_it import MarkdownIt

from knowledge.contracts import DocumentParseError

if TYPE_CHECKING:
    from docx.table import Table


@dataclass(frozen=True, slots=True)
class ParsedSection:
    """A run of text that shares one page (PDF) and one heading."""

    text: str
    page: int | None = None
    heading: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """A parsed file: its title and its non-empty sections in reading order."""

    title: str
    sections: tuple[ParsedSection, ...]


class DocumentParser(Protocol):
    """A parser that can stand in for a built-in one (the PDF parser, by settings).

    ``name`` enters every content hash of the files it parses, so switching parser
    re-indexes them. Parsing is blocking; a file that cannot be parsed raises
    :class:`DocumentParseError` (it is skipped; so is an ``OSError``, taken for the
    file's), any other error stops ingestion."""

    @property
    def name(self) -> str: ...

    def __call__(self, path: Path) -> ParsedDocument: ...


_MAX_TITLE_CHARS = 120
_SPACES = re.compile(r"[ \t\f\v\r]+")
_BLANK_LINES = re.compile(r"\n\s*\n")


def _normalise(text: str) -> str:
    """Trim each line and collapse runs of blank lines to one paragraph break."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short_title(candidate: str | None) -> str | None:
    if candidate is None:
        return None
    line = _one_line(candidate)
    return line[:_MAX_TITLE_CHARS] if line else None


def _stem_title(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ").strip() or path.name


def _decode(data: bytes, path: Path) -> str:
    if b"\x00" in data:
        raise DocumentParseError(f"{path.name}: binary content in a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Legacy Windows exports are common in enterprise shares; cp1252 is their usual charset.
        return data.decode("cp1252", errors="replace")


class _SectionBuilder:
    """Accumulates paragraphs under the current heading into sections. Paragraphs given
    a page (a PDF's layout) also end a section where the page changes, the heading
    carrying on, so a section has one page: its first paragraph's."""

    def __init__(self) -> None:
        self._sections: list[ParsedSection] = []
        self._heading: str | None = None
        self._page: int | None = None
        self._paragraphs: list[str] = []

    def start(self, heading: str | None) -> None:
        self._flush()
        self._heading = heading

    def add(self, paragraph: str, page: int | None = None) -> None:
        text = _normalise(paragraph)
        if not text:
            return
        if self._paragraphs and page is not None and page != self._page:
            self._flush()
        if not self._paragraphs:
            self._page = page
        self._paragraphs.append(text)

    def build(self) -> tuple[ParsedSection, ...]:
        self._flush()
        return tuple(self._sections)

    def _flush(self) -> None:
        if self._paragraphs:
            self._sections.append(
                ParsedSection(
                    text="\n\n".join(self._paragraphs), page=self._page, heading=self._heading
                )
            )
        self._paragraphs = []


def _finish(path: Path, title: str | None, sections: tuple[ParsedSection, ...]) -> ParsedDocument:
    if not sections:
        raise DocumentParseError(f"{path.name}: no extractable text")
    return ParsedDocument(title=title or _stem_title(path), sections=sections)


# --- plain text --------------------------------------------------------------


def _parse_text(path: Path) -> ParsedDocument:
    text = _normalise(_decode(path.read_bytes(), path))
    first_line = text.split("\n", 1)[0] if text else ""
    title = first_line if len(first_line) <= _MAX_TITLE_CHARS else None
    sections = (ParsedSection(text=text),) if text else ()
    return _finish(path, title, sections)


# --- markdown ----------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)", re.DOTALL)
_markdown = MarkdownIt("commonmark")


def _front_matter(source: str) -> tuple[str | None, str]:
    """Strip YAML front matter (common in docs sites) and return its title, if any."""
    found = _FRONT_MATTER.match(source)
    if not found:
        return None, source
    try:
        meta = yaml.safe_load(found.group(1))
    except yaml.YAMLError:
        return None, source
    rest = source[found.end() :]
    title = meta.get("title") if isinstance(meta, dict) else None
    return (str(title) if title is not None else None), rest


def _parse_markdown(path: Path) -> ParsedDocument:
    meta_title, source = _front_matter(_decode(path.read_bytes(), path))
    lines = source.replace("\r\n", "\n").split("\n")
    tokens = _markdown.parse(source)
    # A parser, not a regex, so '#' lines inside code fences are not taken for headings.
    headings: list[tuple[int, int, str, str]] = []
    for position, token in enumerate(tokens):
        if token.type == "heading_open" and token.level == 0 and token.map:
            inline = tokens[position + 1]
            text = "".join(
                child.content
                for child in inline.children or []
                if child.type in ("text", "code_inline")
            )
            headings.append((token.map[0], token.map[1], token.tag, _one_line(text)))

    builder = _SectionBuilder()
    cursor = 0
    first_h1: str | None = None
    for start, end, tag, heading in headings:
        builder.add("\n".join(lines[cursor:start]))
        builder.start(heading or None)
        cursor = end
        if first_h1 is None and tag == "h1":
            first_h1 = heading
    builder.add("\n".join(lines[cursor:]))
    fallback = first_h1 or (headings[0][3] if headings else None)
    return _finish(path, _short_title(meta_title) or _short_title(fallback), builder.build())


# --- HTML --------------------------------------------------------------------

_DROPPED_TAGS = ["script", "style", "nav", "noscript", "template"]
_BLOCK_TAGS = [
    "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "figcaption",
    "figure", "footer", "form", "h4", "h5", "h6", "header", "li", "main", "ol", "p", "pre",
    "section", "ul",
]  # fmt: skip
# Private-use characters survive get_text() and never occur in real documents.
_PARAGRAPH_BREAK = "\ue001"
_LINE_BREAK = "\ue002"
_HEADING_MARK = re.compile("\ue000(\\d+)")


def _parse_html(path: Path) -> ParsedDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_decode(path.read_bytes(), path), "lxml")
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()
    title = _short_title(soup.title.get_text(" ")) if soup.title else None
    if soup.head is not None:
        soup.head.decompose()
    root = soup.body or soup

    # A table becomes one paragraph, a line per row and "|" between cells (as a DOCX
    # table does), so chunking keeps its rows whole and repeats its header row.
    for table in [t for t in root.find_all("table") if t.find_parent("table") is None]:
        rows = [
            " | ".join(
                _one_line(cell.get_text(" "))
                for cell in row.find_all(["td", "th"], recursive=False)
            )
            for row in table.find_all("tr")
            if row.find_parent("table") is table
        ]
        text = _LINE_BREAK.join(row for row in rows if row.strip(" |"))
        table.replace_with(f"{_PARAGRAPH_BREAK}{text}{_PARAGRAPH_BREAK}")
    headings: list[str] = []
    for tag in root.find_all(["h1", "h2", "h3"]):
        headings.append(_one_line(tag.get_text(" ")))
        tag.replace_with(f"{_PARAGRAPH_BREAK}\ue000{len(headings) - 1}{_PARAGRAPH_BREAK}")
    for tag in root.find_all("br"):
        tag.replace_with(_LINE_BREAK)
    for tag in root.find_all(_BLOCK_TAGS):
        tag.insert_before(_PARAGRAPH_BREAK)
        tag.insert_after(_PARAGRAPH_BREAK)

    # HTML whitespace is insignificant: collapse it, then restore the structural breaks.
    flat = " ".join(root.get_text().split())
    builder = _SectionBuilder()
    for block in flat.split(_PARAGRAPH_BREAK):
        marker = _HEADING_MARK.fullmatch(block.strip())
        if marker:
            builder.start(headings[int(marker.group(1))] or None)
        else:
            builder.add(block.replace(_LINE_BREAK, "\n"))
    return _finish(path, title or _short_title(headings[0] if headings else None), builder.build())


# --- PDF ---------------------------------------------------------------------


def _parse_pdf(path: Path) -> ParsedDocument:
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentParseError(f"{path.name}: the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = reader.metadata.title if reader.metadata else None
    except DocumentParseError:
        raise
    except Exception as exc:
        # pypdf raises many exception types on damaged input; all mean "unreadable".
        raise DocumentParseError(f"{path.name}: not a readable PDF ({exc})") from exc

    sections = tuple(
        ParsedSection(text=text, page=number)
        for number, text in ((n, _normalise(raw)) for n, raw in enumerate(pages, start=1))
        if text
    )
    first_line = sections[0].text.split("\n", 1)[0] if sections else None
    return _finish(path, _short_title(meta_title) or _short_title(first_line), sections)


# --- DOCX --------------------------------------------------------------------


def _table_text(table: Table) -> str:
    rows: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            text = _one_line(cell.text)
            # Merged cells repeat in python-docx; keep each value once per row.
            if text and text not in cells:
                cells.append(text)
        if cells:
            rows.append(" | ".join(cells))
    return "\n".join(rows)


def _parse_docx(path: Path) -> ParsedDocument:
    from docx import Document as open_docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = open_docx(str(path))
        blocks = list(document.iter_inner_content())
        meta_title = document.core_properties.title
    except Exception as exc:
        # A damaged or password-protected file is not a valid OOXML zip package.
        raise DocumentParseError(f"{path.name}: not a readable DOCX ({exc})") from exc

    builder = _SectionBuilder()
    style_title: str | None = None
    first_heading: str | None = None
    for block in blocks:
        if isinstance(block, Table):
            builder.add(_table_text(block))
            continue
        if not isinstance(block, Paragraph):
            continue
        text = block.text.strip()
        if not text:
            continue
        style = (block.style.name or "").lower() if block.style is not None else ""
        if style == "title":
            style_title = style_title or text
        elif style.startswith("heading"):
            first_heading = first_heading or text
            builder.start(_one_line(text))
        else:
            builder.add(text)
    title = _short_title(meta_title) or _short_title(style_title) or _short_title(first_heading)
    return _finish(path, title, builder.build())


_PARSERS: dict[str, Callable[[Path], ParsedDocument]] = {
    ".txt": _parse_text,
    ".md": _parse_markdown,
    ".markdown": _parse_markdown,
    ".html": _parse_html,
    ".htm": _parse_html,
    ".pdf": _parse_pdf,
    ".docx": _parse_docx,
}

SUPPORTED_EXTENSIONS = frozenset(_PARSERS)


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_EXTENSIONS


def parse_document(path: Path, *, pdf: DocumentParser | None = None) -> ParsedDocument:
    """Parse ``path`` by its extension, PDFs with ``pdf`` when one is given. Blocking.

    Raises :class:`DocumentParseError` for unsupported, unreadable, corrupt,
    encrypted or text-less files.
    """
    suffix = path.suffix.lower()
    parser = pdf if pdf is not None and suffix == ".pdf" else _PARSERS.get(suffix)
    if parser is None:
        raise DocumentParseError(f"{path.name}: unsupported file type '{path.suffix or path.name}'")
    try:
        return parser(path)
    except OSError as exc:
        raise DocumentParseError(f"{path.name}: cannot read file ({exc.strerror})") from exc
