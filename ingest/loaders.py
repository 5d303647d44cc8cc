"""One small loader per format, registered by suffix. Each turns bytes into blocks:
stretches of text with a page number (PDF) and a heading path (Markdown, HTML, DOCX)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath

from rag_app.errors import LoaderError


@dataclass
class Block:
    text: str
    start_char: int  # offset of `text` in the whole document text
    page: int | None = None
    heading: str = ""


@dataclass
class LoadedDocument:
    title: str
    blocks: list[Block] = field(default_factory=list)


Loader = Callable[[bytes, str], LoadedDocument]
LOADERS: dict[str, Loader] = {}


def register(*suffixes: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        for s in suffixes:
            LOADERS[s] = fn
        return fn
    return wrap


def supported_suffixes() -> list[str]:
    return sorted(LOADERS)


def load_document(data: bytes, name: str) -> LoadedDocument:
    """Parse `data` by the suffix of `name`; raise LoaderError with the reason."""
    suffix = PurePath(name).suffix.lower()
    loader = LOADERS.get(suffix)
    if loader is None:
        raise LoaderError(f"unsupported file type {suffix or '(none)'!r}; "
                          f"supported: {', '.join(supported_suffixes())}")
    try:
        doc = loader(data, name)
    except LoaderError:
        raise
    except Exception as e:  # parser libraries raise many types on corrupt input
        raise LoaderError(f"cannot parse {suffix} file: {type(e).__name__}: {e}") from e
    if not any(b.text.strip() for b in doc.blocks):
        raise LoaderError("no text found (empty file, or a scanned PDF without a text layer)")
    return doc


def _decode(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    if b"\x00" in data:
        raise LoaderError("not a text file (binary content)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")  # legacy Windows text


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def markdown_blocks(text: str) -> list[Block]:
    """Split Markdown at ATX headings (not inside code fences), keeping the heading path."""
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
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, m.group(2).strip())]
            start = m.end()  # the heading lives in the path, not in the chunk text
        if text[start:end].strip():
            blocks.append(Block(text[start:end], start, heading=" > ".join(t for _, t in path)))
    return blocks


def _title_from(blocks: list[Block], name: str) -> str:
    for b in blocks:
        if b.heading:
            return b.heading.split(" > ")[0]
    return PurePath(name).stem


@register(".txt")
def load_text(data: bytes, name: str) -> LoadedDocument:
    text = _decode(data)
    return LoadedDocument(PurePath(name).stem, [Block(text, 0)])


@register(".md", ".markdown")
def load_markdown(data: bytes, name: str) -> LoadedDocument:
    blocks = markdown_blocks(_decode(data))
    return LoadedDocument(_title_from(blocks, name), blocks)


@register(".pdf")
def load_pdf(data: bytes, name: str) -> LoadedDocument:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    blocks, offset = [], 0
    for number, page in enumerate(reader.pages, start=1):
        text = page.extract_text() or ""
        blocks.append(Block(text, offset, page=number))
        offset += len(text) + 1
    title = (reader.metadata.title if reader.metadata else None) or PurePath(name).stem
    return LoadedDocument(str(title), blocks)


@register(".html", ".htm")
def load_html(data: bytes, name: str) -> LoadedDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "nav", "header", "footer", "template"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else ""
    if soup.title:
        soup.title.decompose()
    for level in range(1, 7):  # headings become Markdown so one splitter keeps their path
        for h in soup.find_all(f"h{level}"):
            h.replace_with(f"\n\n{'#' * level} {h.get_text(' ', strip=True)}\n\n")
    text = re.sub(r"\n\s*\n+", "\n\n", soup.get_text("\n")).strip()
    blocks = markdown_blocks(text)
    return LoadedDocument(title or _title_from(blocks, name), blocks)


@register(".docx")
def load_docx(data: bytes, name: str) -> LoadedDocument:
    import docx

    document = docx.Document(io.BytesIO(data))
    lines = []
    for p in document.paragraphs:
        style = (p.style.name or "") if p.style is not None else ""
        level = style.removeprefix("Heading ").strip()
        lines.append(f"{'#' * int(level)} {p.text}" if level.isdigit() and p.text.strip()
                     else p.text)
    blocks = markdown_blocks("\n\n".join(lines))
    title = document.core_properties.title or _title_from(blocks, name)
    return LoadedDocument(title, blocks)
