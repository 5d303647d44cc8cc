"""Find a retrieved passage and an answer's copied span in the document they came from, and
draw them on a PDF page.

The passage's text was extracted at ingest (pypdf for PDFs, the loaders for the rest); the
page shown is read again by PDFium, whose text differs in spacing, line breaks, hyphens,
quotes and ligatures. So text is matched folded: NFKC, case-folded, letters and digits
only; every match maps back to offsets of the original text.
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass, field

MIN_LINE_CHARS = 8  # a shorter line of a passage ("1", "—10—") matches anywhere: not sought
Range = tuple[int, int]


def fold(text: str) -> tuple[str, list[int]]:
    """`text` folded for matching, with the offset in `text` of each folded character."""
    out: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKC", ch).casefold():
            if c.isalnum():
                out.append(c)
                where.append(i)
    return "".join(out), where


class FoldedText:
    """A text prepared for repeated folded searches."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.folded, self.where = fold(text)

    def find(self, needle: str, start: int = 0) -> Range | None:
        """(start, end) in the text of the first folded match of `needle` from offset
        `start` on, or None (also for a needle with no letters or digits)."""
        folded = fold(needle)[0]
        if not folded:
            return None
        begin = next((k for k, w in enumerate(self.where) if w >= start), len(self.where))
        at = self.folded.find(folded, begin)
        if at < 0:
            return None
        return self.where[at], self.where[at + len(folded) - 1] + 1


def passage_ranges(page: FoldedText, passage: str) -> list[Range]:
    """Where `passage` is in `page`: the whole of it, else those of its lines that are
    there in order (a passage may run onto the next page, or its extractor may have
    joined or dropped a line)."""
    whole = page.find(passage)
    if whole is not None:
        return [whole]
    ranges: list[Range] = []
    at = 0
    for line in passage.splitlines():
        if len(fold(line)[0]) < MIN_LINE_CHARS:
            continue
        found = page.find(line, at)
        if found is not None:
            ranges.append(found)
            at = found[1]
    return ranges


def span_range(page: FoldedText, span: str, near: list[Range]) -> Range | None:
    """The copied `span` in `page`: inside the passage (`near`) if it is there, else its
    first occurrence on the page."""
    if near:
        found = page.find(span, near[0][0])
        if found is not None and found[1] <= near[-1][1]:
            return found
    return page.find(span)


@dataclass
class Located:
    """A passage (and span) in one text: each a list of (start, end) offsets in it."""

    text: str
    passage: list[Range] = field(default_factory=list)
    spans: list[Range] = field(default_factory=list)


def locate(text: str, passage: str, spans: list[str]) -> Located:
    folded = FoldedText(text)
    where = passage_ranges(folded, passage)
    found = [r for r in (span_range(folded, s, where) for s in spans) if r is not None]
    return Located(text, where, found)


def window(located: Located, before: int, after: int) -> tuple[int, int]:
    """The part of the text to show around the passage: from a paragraph start up to
    `before` characters ahead of it, to `after` characters past it (the whole text if the
    passage was not found)."""
    marks = located.passage + located.spans
    if not marks:
        return 0, len(located.text)
    first, last = min(m[0] for m in marks), max(m[1] for m in marks)
    text = located.text
    start = text.rfind("\n\n", 0, max(0, first - before))
    start = 0 if start < 0 else start + 2
    if first - start > before:  # no paragraph break near: a line start
        line = text.rfind("\n", 0, first - before)
        start = first - before if line < 0 else line + 1
    end = text.find("\n\n", last + after)
    return start, len(text) if end < 0 else end


@dataclass
class PageImage:
    """A rendered PDF page: PNG bytes, and how many of the sought texts were found on it."""

    png: bytes
    page: int  # 1-based
    pages: int
    passage_found: bool
    spans_found: int


def pdf_page_count(data: bytes) -> int:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        return len(pdf)
    finally:
        pdf.close()


def find_page(data: bytes, first: int, last: int, spans: list[str]) -> int:
    """The page from `first` to `last` (1-based) holding the first of `spans`, else `first`."""
    import pypdfium2 as pdfium

    if not spans:
        return first
    pdf = pdfium.PdfDocument(data)
    try:
        for number in range(first, min(last, len(pdf)) + 1):
            if FoldedText(_page_text(pdf[number - 1])).find(spans[0]) is not None:
                return number
    finally:
        pdf.close()
    return first


def render_pdf_page(data: bytes, page: int, passage: str, spans: list[str],
                    width_px: int = 1000) -> PageImage:
    """Page `page` (1-based) of a PDF as a PNG, the passage shaded and the spans marked
    where the page's text layer has them (a scanned page has none: nothing is marked)."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        pages = len(pdf)
        if not 1 <= page <= pages:
            raise ValueError(f"the PDF has {pages} pages, not page {page}")
        pdf_page = pdf[page - 1]
        width, height = pdf_page.get_size()
        scale = width_px / width
        image = pdf_page.render(scale=scale).to_pil().convert("RGB")
        textpage = pdf_page.get_textpage()
        located = locate(_page_text(pdf_page, textpage), passage, spans)
        boxes = [(_rects(textpage, r), kind) for kind, ranges in
                 (("passage", located.passage), ("span", located.spans)) for r in ranges]
        _draw(image, boxes, scale, height)
    finally:
        pdf.close()
    out = io.BytesIO()
    image.save(out, format="PNG")
    return PageImage(out.getvalue(), page, pages, bool(located.passage), len(located.spans))


def _page_text(pdf_page, textpage=None) -> str:  # noqa: ANN001 - pypdfium2 objects
    """The page's text, one character per PDFium character index."""
    textpage = textpage or pdf_page.get_textpage()
    n = textpage.count_chars()
    text = textpage.get_text_range(0, n)
    if len(text) != n:  # characters outside the BMP: index by index
        text = "".join(textpage.get_text_range(i, 1)[:1] or " " for i in range(n))
    return text


def _rects(textpage, where: Range) -> list[tuple[float, float, float, float]]:  # noqa: ANN001
    count = textpage.count_rects(where[0], where[1] - where[0])
    return [textpage.get_rect(i) for i in range(count)]


_FILL = {"passage": (255, 235, 120, 90), "span": (255, 140, 0, 110)}
_LINE = {"passage": None, "span": (200, 60, 0, 255)}


def _draw(image, boxes, scale: float, height: float) -> None:  # noqa: ANN001 - PIL image
    from PIL import Image, ImageDraw

    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for rects, kind in boxes:
        for left, bottom, right, top in rects:  # PDF points, origin bottom left
            box = (left * scale - 1, (height - top) * scale - 1,
                   right * scale + 1, (height - bottom) * scale + 1)
            draw.rectangle(box, fill=_FILL[kind], outline=_LINE[kind],
                           width=2 if _LINE[kind] else 0)
    image.paste(Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"))
