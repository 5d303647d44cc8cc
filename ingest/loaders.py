"""One small loader per format, registered by suffix. Each turns bytes into blocks:
stretches of text with a page number and its printed label (PDF), a heading path
(Markdown, HTML, DOCX) and the spans of its code blocks (kept whole by the chunker)."""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import charset_normalizer

from rag_app.errors import LoaderError
from rag_app.settings import IngestionSettings

if TYPE_CHECKING:
    from pypdf import PdfReader

log = logging.getLogger(__name__)
MB = 1024 * 1024


@dataclass
class Block:
    text: str
    start_char: int  # offset of `text` in the whole document text
    page: int | None = None
    heading: str = ""
    page_end: int | None = None  # set when short pages were merged into one block
    page_label: str | None = None  # the page's printed label (PDF /PageLabels): "iv", "25"
    # (start, end) of each code block in `text`: the chunker cuts one only if it is
    # larger than a chunk
    code: list[tuple[int, int]] = field(default_factory=list)
    # An entry of a definition list (an option, a function, a glossary term) starts here:
    # the chunker may put it in one chunk with the block before it (same section) while
    # both fit, but never cuts an entry that fits in a chunk
    joins: bool = False


@dataclass
class LoadedDocument:
    title: str
    blocks: list[Block] = field(default_factory=list)


Loader = Callable[[bytes, str, IngestionSettings], LoadedDocument]
LOADERS: dict[str, Loader] = {}


def register(*suffixes: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        for s in suffixes:
            LOADERS[s] = fn
        return fn
    return wrap


def supported_suffixes() -> list[str]:
    return sorted(LOADERS)


def load_document(data: bytes, name: str, limits: IngestionSettings) -> LoadedDocument:
    """Parse `data` by the suffix of `name` within `limits` (PDF pages, the unpacked size of
    a DOCX); raise LoaderError with the reason. A MemoryError goes up as it is: the parser
    process reports it as over its memory limit."""
    suffix = PurePath(name).suffix.lower()
    loader = LOADERS.get(suffix)
    if loader is None:
        raise LoaderError(f"unsupported file type {suffix or '(none)'!r}; "
                          f"supported: {', '.join(supported_suffixes())}")
    try:
        doc = loader(data, name, limits)
    except (LoaderError, MemoryError):
        raise
    except Exception as e:  # parser libraries raise many types on corrupt input
        raise LoaderError(f"cannot parse {suffix} file: {type(e).__name__}: {e}") from e
    if not any(b.text.strip() for b in doc.blocks):
        if suffix == ".pdf":
            raise LoaderError("no extractable text (a scanned PDF without a text layer?)")
        if suffix in (".html", ".htm"):
            raise LoaderError("no text found outside navigation, scripts and markup")
        raise LoaderError("no text found (empty file)")
    return doc


def _decode(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    if b"\x00" in data:
        raise LoaderError("not a text file (binary content)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return _decode_legacy(data)


def _decode_legacy(data: bytes) -> str:
    """Detect a legacy encoding. Windows-1252 wins near-ties: short Western European texts
    decode equally "cleanly" in several code pages, and 1252 is by far the most common."""
    matches = list(charset_normalizer.from_bytes(data))
    if not matches:
        raise LoaderError("not a text file (unknown encoding)")
    best = matches[0]
    for m in matches:
        if m.encoding == "cp1252" and m.chaos <= best.chaos and \
                m.coherence >= best.coherence - 0.1:
            return str(m)
    return str(best)


# The closing `#`s and blanks are stripped after the match: `(.+?)[ \t#]*$` backtracks over
# every blank for every character (minutes for one heading line of 100,000 spaces).
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+)$", re.MULTILINE)
# A fence closes at a line of the same fence (at least as long), or the text's end.
_FENCE = re.compile(r"""
    ^[ ]{0,3}(?P<f>`{3,}|~{3,})[^\n]*     # the opening fence and its info string
    (?:\n.*?)??                            # the code
    (?:\n[ ]{0,3}(?P=f)[`~]*[ \t]*$|\Z)   # a closing fence at least as long, or the end
    """, re.MULTILINE | re.DOTALL | re.VERBOSE)


def markdown_blocks(text: str) -> list[Block]:
    """Split Markdown at ATX headings (not inside code fences), keeping the heading path
    and the spans of the fenced code blocks."""
    fenced = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
    heads = [m for m in _HEADING.finditer(text)
             if not any(a <= m.start() < b for a, b in fenced)]
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []
    starts = [0] + [m.start() for m in heads]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        if i > 0:
            m = heads[i - 1]
            level = len(m.group(1))
            title = m.group(2).rstrip(" \t#").strip() or m.group(2)[:1].strip()
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, title)]
            start = m.end()  # the heading lives in the path, not in the chunk text
        if text[start:end].strip():
            code = [(max(a, start) - start, min(b, end) - start) for a, b in fenced
                    if a < end and b > start]
            blocks.append(Block(text[start:end], start, heading=" > ".join(t for _, t in path),
                                code=code))
    return blocks


def _title_from(blocks: list[Block], name: str) -> str:
    for b in blocks:
        if b.heading:
            return b.heading.split(" > ")[0]
    return PurePath(name).stem


@register(".txt")
def load_text(data: bytes, name: str, limits: IngestionSettings) -> LoadedDocument:
    text = _decode(data)
    return LoadedDocument(PurePath(name).stem, [Block(text, 0)])


@register(".md", ".markdown")
def load_markdown(data: bytes, name: str, limits: IngestionSettings) -> LoadedDocument:
    blocks = markdown_blocks(_decode(data))
    return LoadedDocument(_title_from(blocks, name), blocks)


@register(".pdf")
def load_pdf(data: bytes, name: str, limits: IngestionSettings) -> LoadedDocument:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    pages = len(reader.pages)  # the page tree's /Count: iterating stops there too
    if pages > limits.max_pdf_pages:
        raise LoaderError(f"{pages} pages, more than ingestion.max_pdf_pages="
                          f"{limits.max_pdf_pages}: not parsed")
    labels = page_labels(reader, pages)
    blocks, offset = [], 0
    for number, page in enumerate(reader.pages, start=1):
        text = page.extract_text() or ""
        blocks.append(Block(text, offset, page=number, page_label=labels[number - 1]))
        offset += len(text) + 1
    title = (reader.metadata.title if reader.metadata else None) or PurePath(name).stem
    return LoadedDocument(str(title), blocks)


def page_labels(reader: PdfReader, pages: int) -> list[str | None]:
    """Each page's printed label ("iv", "25", "A-3") from the PDF's /PageLabels; None for
    every page of a PDF without them (or with a broken tree: the pages still load)."""
    if "/PageLabels" not in reader.trailer["/Root"]:
        return [None] * pages
    try:
        labels = list(reader.page_labels)
    except Exception as e:  # a malformed number tree; pypdf raises many types
        log.warning("ignoring the PDF's page labels: %s: %s", type(e).__name__, e)
        return [None] * pages
    return [*labels, *[None] * pages][:pages]


@register(".csv")
def load_csv(data: bytes, name: str, limits: IngestionSettings,
             rows_per_block: int = 20) -> LoadedDocument:
    """Groups of rows, each block starting with the header so every chunk keeps it."""
    import csv

    text = _decode(data)
    lines = text.splitlines(keepends=True)
    rows = list(csv.reader(lines))
    if not rows:
        return LoadedDocument(PurePath(name).stem, [])
    header, offset = ", ".join(rows[0]), len(lines[0])
    blocks = []
    for i in range(1, len(rows), rows_per_block):
        group = rows[i:i + rows_per_block]
        body = "\n".join("; ".join(f"{h}: {v}" for h, v in zip(rows[0], r, strict=False))
                         for r in group)
        blocks.append(Block(body, offset, heading=header))
        offset += sum(len(line) for line in lines[i:i + rows_per_block])
    return LoadedDocument(PurePath(name).stem, blocks)


@register(".html", ".htm")
def load_html(data: bytes, name: str, limits: IngestionSettings) -> LoadedDocument:
    from ingest.html import html_blocks

    title, blocks = html_blocks(data)
    return LoadedDocument(title or _title_from(blocks, name), blocks)


def check_unpacked_size(data: bytes, limits: IngestionSettings) -> None:
    """Refuse a zip-based file (DOCX) whose parts unpack to more than
    `ingestion.max_file_mb`, before any parser opens it. The sizes in the zip's directory
    are binding: Python's zipfile never inflates a member past its stated size (it stops
    there, and a lie fails the CRC check), so a zip bomb cannot grow past the sum."""
    members = zipfile.ZipFile(io.BytesIO(data)).infolist()  # BadZipFile: cannot parse
    total = sum(m.file_size for m in members)
    if total > limits.max_file_mb * MB:
        raise LoaderError(f"unpacks to {total / MB:.0f} MB, more than ingestion.max_file_mb="
                          f"{limits.max_file_mb:g}: not parsed")


@register(".docx")
def load_docx(data: bytes, name: str, limits: IngestionSettings) -> LoadedDocument:
    """Paragraphs and tables in document order: "Heading N" styles are headings, runs of
    code-styled paragraphs (or all-monospace ones) one code block, a table a line per row."""
    import docx
    from docx.table import Table

    check_unpacked_size(data, limits)
    document = docx.Document(io.BytesIO(data))
    lines: list[str] = []
    code: list[str] = []
    for item in document.iter_inner_content():
        if not isinstance(item, Table) and _is_code(item):
            code.append(item.text)
            continue
        if code:  # a fence longer than any backtick run inside keeps the block whole
            lines.append(_fenced("\n".join(code)))
            code = []
        if isinstance(item, Table):
            lines.append("\n".join(" | ".join(_cell_text(c) for c in row.cells)
                                   for row in item.rows))
            continue
        style = (item.style.name or "") if item.style is not None else ""
        level = style.removeprefix("Heading ").strip()
        lines.append(f"{'#' * int(level)} {item.text}" if level.isdigit() and item.text.strip()
                     else item.text)
    if code:
        lines.append(_fenced("\n".join(code)))
    blocks = markdown_blocks("\n\n".join(lines))
    title = document.core_properties.title or _title_from(blocks, name)
    return LoadedDocument(title, blocks)


_CODE_STYLES = ("code", "source", "preformatted", "verbatim", "macro")
_MONOSPACE = ("courier", "consolas", "mono", "menlo", "monaco")


def _is_code(paragraph: Any) -> bool:
    style = ((paragraph.style.name or "") if paragraph.style is not None else "").lower()
    if any(s in style for s in _CODE_STYLES):
        return True
    runs = [r for r in paragraph.runs if r.text.strip()]
    return bool(runs) and all(any(m in (r.font.name or "").lower() for m in _MONOSPACE)
                              for r in runs)


def _cell_text(cell: Any) -> str:
    return " ".join(cell.text.split())


def _fenced(code: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{code}\n{fence}"
