"""Which HTML extractor keeps what a reader reads: the loader before this change (bs4,
whole page), bs4 with rules (ingest/html.py, the loader now), trafilatura and
readability-lxml, on real pages of Debian's documentation packages.

    python benchmarks/corpus.py && python benchmarks/html_extract.py

Per extractor, over the pages (each page's source text, reStructuredText or asciidoc,
shipped beside it, is the ground truth of its words):
- chrome lines: lines of the output that are text of the page outside its main content
  (navigation, sidebars, headers, footers) and nowhere in it
- extra words: words of the output that are not in the page's source (a few rendered
  words such as "New in version" are always there)
- source words: distinct words of the source found in the output
- code verbatim: `pre` blocks of the page found whole, character for character, in one block
- false headings: heading-path parts that are no h1–h6 of the page
- headings: the page's h1–h6 found as headings
- inline code: inline `code` elements found with their spacing, on one line
- ms/page: loading time (this machine; the order matters, not the figures)
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bs4 import BeautifulSoup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.corpus import CORPUS, GIT_HTML, PY_HTML  # noqa: E402
from ingest.html import html_blocks  # noqa: E402
from ingest.loaders import Block, markdown_blocks  # noqa: E402

PY, GIT = CORPUS / "python3.11-doc" / PY_HTML, CORPUS / "git-doc" / GIT_HTML
# page -> its source
PAGES = {
    PY / "library/json.html": PY / "_sources/library/json.rst.txt",
    PY / "library/collections.html": PY / "_sources/library/collections.rst.txt",
    PY / "library/csv.html": PY / "_sources/library/csv.rst.txt",
    PY / "library/string.html": PY / "_sources/library/string.rst.txt",
    PY / "tutorial/datastructures.html": PY / "_sources/tutorial/datastructures.rst.txt",
    GIT / "git-cat-file.html": GIT / "git-cat-file.txt",
    GIT / "gittutorial.html": GIT / "gittutorial.txt",
    GIT / "git-rebase.html": GIT / "git-rebase.txt",
}
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
Extractor = Callable[[bytes], list[Block]]
TOTALS = ("chrome lines", "false headings")


def before(data: bytes) -> list[Block]:
    """The HTML loader before ingest/html.py (main at c5c7181)."""
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "nav", "header", "footer", "template"]):
        tag.decompose()
    if soup.title:
        soup.title.decompose()
    for level in range(1, 7):
        for h in soup.find_all(f"h{level}"):
            h.replace_with(f"\n\n{'#' * level} {h.get_text(' ', strip=True)}\n\n")
    return markdown_blocks(re.sub(r"\n\s*\n+", "\n\n", soup.get_text("\n")).strip())


def bs4_rules(data: bytes) -> list[Block]:
    return html_blocks(data)[1]


def trafilatura_md(data: bytes) -> list[Block]:
    import trafilatura

    text = trafilatura.extract(data.decode("utf-8"), output_format="markdown",
                               include_tables=True, include_formatting=True,
                               include_comments=False, include_links=False) or ""
    return markdown_blocks(text)


def readability(data: bytes) -> list[Block]:
    """readability-lxml picks the content; ingest/html.py converts it."""
    from readability import Document

    return html_blocks(Document(data.decode("utf-8")).summary(html_partial=True).encode())[1]


EXTRACTORS: dict[str, Extractor] = {"bs4, before": before, "bs4 + rules (now)": bs4_rules,
                                    "trafilatura 2.3": trafilatura_md,
                                    "readability-lxml 0.9": readability}


def _key(text: str) -> str:
    return re.sub(r"\W+", "", text.replace("¶", "")).lower()


def truth(page: Path) -> dict[str, list[str]]:
    """The page's headings, code blocks and inline code, read from its main content."""
    soup = BeautifulSoup(page.read_bytes(), "html.parser")
    main = soup.select_one("[role=main]") or soup.select_one("#content") or soup
    inline = [" ".join(c.get_text().split()) for c in main.find_all("code")
              if c.find_parent("pre") is None and c.get_text().strip()]
    inline = [c for c in inline if " " in c] or inline
    found = {"headings": [_key(h.get_text()) for h in main.find_all(
                 [f"h{n}" for n in range(1, 7)])],
             "code": [p.get_text().strip("\n") for p in main.find_all("pre")],
             "inline": inline}
    inside = _key(main.get_text())
    main.decompose()
    outside = {x.strip() for x in soup.get_text("\n").splitlines()}
    found["chrome"] = [x for x in outside if len(_key(x)) > 2 and _key(x) not in inside]
    return found


def measure(extract: Extractor, page: Path, source: Path) -> dict[str, float]:
    data = page.read_bytes()
    start = time.perf_counter()
    blocks = extract(data)
    ms = (time.perf_counter() - start) * 1000
    text = "\n\n".join(b.text for b in blocks)
    source_words = set(WORD.findall(source.read_text(errors="replace").lower()))
    words = [w.lower() for w in WORD.findall(text)]
    found = set(words)
    t = truth(page)
    parts = {p for b in blocks for p in b.heading.split(" > ") if p}
    real = set(t["headings"])
    chrome = set(t["chrome"])
    return {
        "chrome lines": sum(line.strip() in chrome for line in text.splitlines()),
        "extra words %": 100 * sum(w not in source_words for w in words) / max(len(words), 1),
        "source words %": 100 * len(found & source_words) / len(source_words),
        "code verbatim %": 100 * statistics.mean(
            any(c in b.text for b in blocks) for c in t["code"]) if t["code"] else 100.0,
        "false headings": sum(_key(p) not in real for p in parts),
        "headings %": 100 * statistics.mean(any(_key(p) == h for p in parts) for h in real)
        if real else 100.0,
        "inline code %": 100 * statistics.mean(c in text for c in t["inline"])
        if t["inline"] else 100.0,
        "ms/page": ms,
    }


def main() -> None:
    missing = [p for p in [*PAGES, *PAGES.values()] if not p.exists()]
    if missing:
        sys.exit(f"missing {missing[0]}: run `python benchmarks/corpus.py` first")
    extractors = {}
    for name, extract in EXTRACTORS.items():  # imports and first calls out of the timing
        try:
            extract(next(iter(PAGES)).read_bytes())
        except ImportError as e:
            print(f"skipped {name}: {e} (pip install 'rag_app[bench-html]')")
            continue
        extractors[name] = extract
    rows = {}
    for name, extract in extractors.items():
        per_page = [measure(extract, page, source) for page, source in PAGES.items()]
        rows[name] = {k: (sum if k in TOTALS else statistics.mean)(
            [m[k] for m in per_page]) for k in per_page[0]}
    columns = list(next(iter(rows.values())))
    print(f"{len(PAGES)} pages (5 Sphinx from python3.11-doc, 3 asciidoc from git-doc); "
          "chrome lines, false headings: total; the rest: mean per page\n")
    print("| extractor | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.0f}" if c != "extra words %"
                                          else f"{row[c]:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
