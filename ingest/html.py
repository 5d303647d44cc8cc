"""HTML to blocks: what a reader of the page reads, and nothing of the page's chrome.

The main content is the first of `MAIN` that holds text (Sphinx's `div.body`, `<main>`,
`<article>`, asciidoc's `#content`, ...), else the body; inside it, navigation, sidebars,
headers/footers, buttons and permalink marks are dropped (`DROP`). Headings come from real
`h1`–`h6` only, never from text that looks like Markdown; `pre` blocks are kept verbatim
and their spans recorded on the block (`Block.code`) so the chunker keeps each whole;
inline text (inline code too) is joined as the browser shows it, on one line; a table
becomes one line per row, its cells separated by " | ".
Chosen over trafilatura and readability-lxml by `benchmarks/html_extract.py` (README).
"""

from __future__ import annotations

import re
from typing import Any

from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.element import Comment, Declaration, Doctype, ProcessingInstruction

from ingest.loaders import Block

MAIN = ["main", "[role=main]", "article", "div.body", "#content", "div.document", "body"]
DROP = ", ".join([
    "script", "style", "noscript", "template", "iframe", "svg", "form", "button", "nav",
    "footer", "aside", "[role=navigation]", "[role=banner]", "[role=contentinfo]",
    "[role=search]", "[role=complementary]", "[hidden]", "[aria-hidden=true]",
    ".headerlink", ".sphinxsidebar", ".related", ".copybutton", "#toc", ".toc",
])
BLOCK_TAGS = frozenset([
    "address", "article", "aside", "blockquote", "caption", "center", "dd", "details",
    "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "hgroup", "hr", "li",
    "main", "ol", "p", "section", "summary", "ul"])
HEADINGS = {f"h{n}": n for n in range(1, 7)}
_SKIP = (Comment, Declaration, Doctype, ProcessingInstruction)
_SPACES = re.compile(r"[ \t\r\f\v\n]+")


def html_blocks(data: bytes) -> tuple[str, list[Block]]:
    """The page's title (a man page's NAME line, else `<title>`) and its main content as
    blocks split at its headings."""
    soup = BeautifulSoup(data, "html.parser")
    title = manpage_name(soup) or (_inline_text(soup.title) if soup.title else "")
    writer = _Writer()
    _walk(main_content(soup), writer)
    return title, writer.finish()


def manpage_name(soup: BeautifulSoup) -> str:
    """An asciidoc man page's NAME line ("git-rebase - Reapply commits on top of another
    base tip"): it sits in the page's header, outside the main content, and says what the
    page is about better than its `<title>` ("git-rebase(1)"); "" for other pages."""
    for h2 in soup.select("#header > h2"):
        body = h2.find_next_sibling("div")
        if _inline_text(h2).upper() == "NAME" and body is not None:
            return _inline_text(body)
    return ""


def main_content(soup: BeautifulSoup) -> Tag:
    """The first `MAIN` element with text, without its `DROP` parts (a `header` only when
    it holds no heading: an article's own header carries its title)."""
    for tag in soup.select(DROP):
        if not tag.decomposed:
            tag.decompose()
    for tag in soup.find_all("header"):
        if not tag.find(list(HEADINGS)):
            tag.decompose()
    for selector in MAIN:
        found = soup.select_one(selector)
        if found is not None and found.get_text(strip=True):
            return found
    return soup


def _walk(root: Tag, writer: _Writer) -> None:
    """Depth first without recursion (a page nested 100,000 deep must not overflow)."""
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if isinstance(node, _SKIP):
            continue
        if isinstance(node, NavigableString):
            writer.text(str(node))
            continue
        name = node.name
        if leaving:
            if name in BLOCK_TAGS:
                writer.paragraph()
            if name == "dt":  # a term stays on the line above its description
                writer.tight = True
            continue
        if name in HEADINGS:
            writer.heading(HEADINGS[name], _inline_text(node))
        elif name == "dt" and _starts_entry(node):
            writer.entry()
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.contents))
        elif name == "pre":
            writer.code(node.get_text())
        elif name == "table" and node.find("pre") is None:
            writer.table([[_inline_text(c) for c in tr.find_all(["th", "td"])]
                          for tr in node.find_all("tr")])
        elif name == "br":
            writer.line_break()
        else:
            if name in BLOCK_TAGS:
                writer.paragraph()
            if name == "li":
                writer.bullet = "- "
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.contents))


def _starts_entry(dt: Tag) -> bool:
    """The first term of a definition-list entry (`--autostash` of `--autostash`,
    `--no-autostash`: one entry with two terms)."""
    before = dt.find_previous_sibling(True)
    return before is None or before.name != "dt"


def _inline_text(tag: Tag) -> str:
    """A heading's or a cell's text as shown: inline parts joined, whitespace collapsed."""
    parts = [str(s) for s in tag.find_all(string=True) if not isinstance(s, _SKIP)]
    return _SPACES.sub(" ", "".join(parts)).strip()


class _Writer:
    """Collects paragraphs into blocks, a new block at each heading."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.path: list[tuple[int, str]] = []
        self.paragraphs: list[str] = []
        self.code_spans: list[tuple[int, int]] = []
        self.inline: list[str] = []
        self.bullet = ""  # "- " before a list item's first paragraph
        self.joins = False  # the next block starts an entry of a definition list
        # the next paragraph goes on the line below the last (a definition-list term's
        # description), so the splitter, cutting at blank lines first, keeps them together
        self.tight = False
        self.offset = 0  # of the current block in the document's text (blocks + "\n\n")

    def text(self, s: str) -> None:
        self.inline.append(_SPACES.sub(" ", s))

    def line_break(self) -> None:
        self.inline.append("\n")

    def paragraph(self) -> None:
        if not self.inline:
            return
        # lines broken by <br> only; spaces at the joins of inline elements collapse as
        # the browser collapses them
        lines = (re.sub(r" {2,}", " ", line).strip() for line in "".join(self.inline).split("\n"))
        self.inline = []
        text = "\n".join(line for line in lines if line)
        if text and self.tight and self.paragraphs:
            self.paragraphs[-1] += "\n" + self.bullet + text
        elif text:
            self.paragraphs.append(self.bullet + text)
        if text:
            self.bullet = ""
            self.tight = False

    def code(self, text: str) -> None:
        self.paragraph()
        self.tight = False
        text = text.strip("\n")
        if text.strip():
            start = self._length()
            self.paragraphs.append(text)
            self.code_spans.append((start, start + len(text)))

    def table(self, rows: list[list[str]]) -> None:
        self.paragraph()
        lines = [" | ".join(cells) for cells in rows if any(cells)]
        if lines:
            self.paragraphs.append("\n".join(lines))

    def heading(self, level: int, title: str) -> None:
        self._close()
        if title:
            self.path = [(lvl, t) for lvl, t in self.path if lvl < level] + [(level, title)]

    def entry(self) -> None:
        """A definition-list entry starts: a new block, in the same section."""
        self._close()
        self.joins = True

    def finish(self) -> list[Block]:
        self._close()
        return self.blocks

    def _length(self) -> int:
        return sum(len(p) + 2 for p in self.paragraphs)

    def _close(self) -> None:
        self.paragraph()
        if self.paragraphs:
            text = "\n\n".join(self.paragraphs)
            self.blocks.append(Block(text, self.offset, heading=" > ".join(
                t for _, t in self.path), code=self.code_spans, joins=self.joins))
            self.offset += len(text) + 2
            self.joins = False
        self.paragraphs, self.code_spans = [], []
