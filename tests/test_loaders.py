import io
from pathlib import Path

import pytest

from ingest.chunking import chunk_blocks, embedding_text
from ingest.loaders import load_document, markdown_blocks
from rag_app.errors import LoaderError
from rag_app.settings import IngestionSettings

LIMITS = IngestionSettings()

MD = """# Guide

Intro text.

## Install

Run the installer.

```
# not a heading inside a fence
```

### Linux

Use the package.

## Use

Ask questions.
"""


def test_markdown_keeps_heading_path_and_offsets() -> None:
    blocks = markdown_blocks(MD)
    assert [b.heading for b in blocks] == [
        "Guide", "Guide > Install", "Guide > Install > Linux", "Guide > Use"]
    for b in blocks:
        assert MD[b.start_char:b.start_char + len(b.text)] == b.text
    assert "# not a heading" in blocks[1].text


def test_html_main_text_without_scripts_or_styles() -> None:
    html = (b"<html><head><title>T</title><style>p{color:red}</style></head><body>"
            b"<script>alert(1)</script><h1>Top</h1><p>Hello</p><h2>Sub</h2><p>World</p>"
            b"</body></html>")
    doc = load_document(html, "page.html", LIMITS)
    text = " ".join(b.text for b in doc.blocks)
    assert doc.title == "T"
    assert "Hello" in text and "World" in text
    assert "alert" not in text and "color" not in text
    assert [b.heading for b in doc.blocks] == ["Top", "Top > Sub"]


def test_docx_paragraphs_and_headings() -> None:
    import docx

    d = docx.Document()
    d.add_heading("Manual", level=1)
    d.add_paragraph("The pump runs at 40 litres per minute.")
    buf = io.BytesIO()
    d.save(buf)
    doc = load_document(buf.getvalue(), "manual.docx", LIMITS)
    assert doc.blocks[0].heading == "Manual"
    assert "40 litres" in doc.blocks[0].text


def test_pdf_pages_are_numbered(pdf_bytes) -> None:
    doc = load_document(pdf_bytes(["alpha page", "beta page"], 300, 300), "two.pdf",
                        LIMITS)
    assert [(b.page, b.text.strip()) for b in doc.blocks] == [(1, "alpha page"), (2, "beta page")]


@pytest.mark.parametrize(("data", "name", "reason"), [
    (b"PK\x03\x04 not really a zip", "broken.docx", "cannot parse .docx"),
    (b"%PDF-1.4 garbage", "broken.pdf", "cannot parse .pdf|no text"),
    (b"\x00\x01\x02\xff\xfe\x00", "binary.txt", "not a text file"),
    (b"", "empty.md", "no text found"),
    (b"x", "image.png", "unsupported file type '.png'"),
])
def test_bad_input_raises_loader_error_with_reason(data: bytes, name: str, reason: str) -> None:
    with pytest.raises(LoaderError, match=reason):
        load_document(data, name, LIMITS)


def test_chunks_respect_token_budget_and_never_split_words(services) -> None:
    text = ("Retrieval augmented generation grounds answers in documents. " * 80).strip()
    blocks = markdown_blocks(text)
    count = services.embedder.count_tokens
    chunks = chunk_blocks(blocks, count, 64, 16)
    assert len(chunks) > 5
    words = set(text.split())
    for c in chunks:
        assert count(c.text) <= 64
        assert text[c.start_char:c.end_char] == c.text
        assert set(c.text.split()) <= words  # whole words only
    # neighbouring chunks overlap
    assert chunks[1].start_char < chunks[0].end_char


@pytest.mark.parametrize("kind", ["repeated", "random letters", "japanese"])
def test_text_without_separators_is_chunked_with_linear_work(services, kind: str) -> None:
    """A run with no space or newline used to be cut into single characters, each counted
    (three tokenizer calls per character); now every character is tokenized about once."""
    import random

    from ingest.loaders import Block

    rng = random.Random(3)
    text = {"repeated": "a" * 64_000,
            "random letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                      for _ in range(64_000)),
            "japanese": "".join(rng.choice("日本語の文章を書く") for _ in range(20_000))}[kind]
    count = services.embedder.count_tokens
    work = {"calls": 0, "chars": 0}

    def counting(t: str) -> int:
        work["calls"] += 1
        work["chars"] += len(t)
        # fail at once, not after minutes, when the work is not linear in the text
        assert work["chars"] <= 2 * len(text), "tokenized each character more than twice"
        return count(t)

    chunks = chunk_blocks([Block(text, 0)], counting, 200, 32)
    assert work["calls"] <= len(text) // 8
    for c in chunks:
        assert text[c.start_char:c.end_char] == c.text
        assert count(c.text) <= 200
    # every character is in a chunk, and neighbours overlap or touch
    assert chunks[0].start_char == 0 and chunks[-1].end_char == len(text)
    assert all(b.start_char <= a.end_char for a, b in zip(chunks, chunks[1:], strict=False))
    assert len(chunks) > 5 and any(b.start_char < a.end_char
                                   for a, b in zip(chunks, chunks[1:], strict=False))


# -- real documents (tests/corpus: Debian's python3.11-doc, git-doc, texlive-latex-base-doc;
# rebuilt by `benchmarks/corpus.py --pdf --fixtures`) ----------------------------------------
CORPUS = Path(__file__).resolve().parent / "corpus"


def _load(name: str):
    return load_document((CORPUS / name).read_bytes(), name, LIMITS)


def _page_truth(name: str) -> dict:
    """What the page's main content holds, read with bs4 directly: headings, pre blocks."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup((CORPUS / name).read_bytes(), "html.parser")
    main = soup.select_one("[role=main]") or soup.select_one("#content")
    for link in main.select(".headerlink"):
        link.decompose()
    return {"headings": {" ".join(h.get_text().split())
                         for h in main.find_all(["h1", "h2", "h3", "h4", "h5", "h6"])},
            "code": [p.get_text().strip("\n") for p in main.find_all("pre")]}


@pytest.mark.parametrize("name", ["python-json.html", "python-collections.html",
                                  "git-cat-file.html"])
def test_real_html_keeps_main_content_real_headings_and_verbatim_code(name: str) -> None:
    doc = _load(name)
    truth = _page_truth(name)
    text = "\n\n".join(b.text for b in doc.blocks)
    # headings only from h1-h6: never a code comment ("# Tally occurrences ...")
    parts = {p for b in doc.blocks for p in b.heading.split(" > ")}
    assert parts <= truth["headings"] and len(parts) >= 5
    # every code block whole and verbatim, and recorded as code on its block
    assert truth["code"]
    for code in truth["code"]:
        (block,) = [b for b in doc.blocks if code in b.text][:1]
        at = block.text.index(code)
        assert (at, at + len(code)) in block.code
    # the page's chrome is gone: Sphinx's sidebar, related bar and footer; asciidoc's footer
    for chrome in ("Previous topic", "Next topic", "This Page", "Show Source", "Navigation",
                   "Report a Bug", "Copyright", "Last updated", "index |", "¶"):
        assert chrome not in text, chrome


def test_sphinx_inline_code_keeps_its_spacing_and_tables_are_rows() -> None:
    text = "\n\n".join(b.text for b in _load("python-json.html").blocks)
    # was "(',\n\n',\n\n':\n\n')": each <span class="pre"> on a line of its own
    assert "The default is (', ', ': ') if indent is None and (',', ': ') otherwise." in text
    assert "\nobject | dict\narray | list\n" in text
    doc = _load("python-collections.html")
    assert doc.title == "collections — Container datatypes — Python 3.11.2 documentation"
    assert "deque | list-like container with fast appends and pops on either end" in \
        doc.blocks[0].text


def test_a_code_block_that_fits_is_never_cut_and_a_larger_one_only_between_lines(
        services) -> None:
    count = services.embedder.count_tokens
    blocks = _load("python-collections.html").blocks
    chunks = chunk_blocks(blocks, count, 128, 24)
    codes = [(b, a, z) for b in blocks for a, z in b.code]
    fits = [b.text[a:z] for b, a, z in codes if count(b.text[a:z]) <= 128]
    assert len(fits) > 20 and len(fits) < len(codes)  # both kinds on this page
    for code in fits:
        assert any(code in c.text for c in chunks), code[:60]
    for block, a, z in codes:
        code = block.text[a:z]
        if count(code) <= 128:
            continue
        # a larger one: each chunk's part of it starts and ends at a line's ends (a chunk's
        # first line without its indent: chunks are stripped)
        start, end = block.start_char + a, block.start_char + z
        parts = [(max(c.start_char, start) - start, min(c.end_char, end) - start)
                 for c in chunks if c.start_char < end and c.end_char > start]
        assert len(parts) >= 2
        for x, y in parts:
            assert x == 0 or code[:x].rstrip(" \t")[-1:] == "\n", code[x:x + 40]
            assert y == len(code) or code[y] == "\n", code[y - 40:y]
    for c in chunks:
        assert count(c.text) <= 128


def test_markdown_code_fence_is_kept_whole_by_the_chunker(services) -> None:
    # blank lines inside: the splitter's first cut, were the block not protected
    code = "```python\n" + "\n\n".join(f"# step {i}\nvalue_{i} = compute({i})"
                                        for i in range(8)) + "\n```"
    text = "# Guide\n\n" + "Some words of prose here. " * 30 + "\n" + code + "\n\nAfter it.\n"
    blocks = markdown_blocks(text)
    assert [b.heading for b in blocks] == ["Guide"]
    count = services.embedder.count_tokens
    assert count(code) < 128
    chunks = chunk_blocks(blocks, count, 128, 16)
    assert len(chunks) >= 2 and any(code in c.text for c in chunks)
    for c in chunks:
        assert text[c.start_char:c.end_char] == c.text


def test_docx_code_paragraphs_become_one_block_and_tables_rows() -> None:
    import docx

    d = docx.Document()
    d.add_heading("Setup", level=1)
    d.add_paragraph("Run this:")
    d.add_paragraph("# install it", style="macro")
    d.add_paragraph("pip install rag-app", style="macro")
    mono = d.add_paragraph().add_run("rag ingest data/")
    mono.font.name = "Courier New"
    table = d.add_table(rows=2, cols=2)
    for (r, c), value in {(0, 0): "flag", (0, 1): "meaning", (1, 0): "--page",
                          (1, 1): "physical page"}.items():
        table.cell(r, c).text = value
    d.add_paragraph("Done.")
    buf = io.BytesIO()
    d.save(buf)
    doc = load_document(buf.getvalue(), "setup.docx", LIMITS)
    assert [b.heading for b in doc.blocks] == ["Setup"]  # "# install it" is code
    (block,) = doc.blocks
    (span,) = block.code
    assert block.text[span[0]:span[1]] == \
        "```\n# install it\npip install rag-app\nrag ingest data/\n```"
    assert "flag | meaning\n--page | physical page\n\nDone." in block.text


def test_pdf_printed_page_labels_beside_physical_pages() -> None:
    doc = _load("amsldoc-pages.pdf")  # amsldoc's PDF pages 2, 5 and 29
    assert [(b.page, b.page_label) for b in doc.blocks] == [(1, "ii"), (2, "1"), (3, "25")]
    assert "poor man’s bold" in doc.blocks[2].text


def test_pdf_without_page_labels_and_two_columns_in_reading_order() -> None:
    (page,) = _load("tugboat-babelbib-p1.pdf").blocks  # a TUGboat article: two columns
    assert page.page == 1 and page.page_label is None
    order = ["1 Introduction", "This is unsatisfactory", "The package babelbib provides",
             "2 Multilingual bibliographies", "2.1 Available packages"]
    at = [page.text.index(s) for s in order]
    assert at == sorted(at)


@pytest.mark.parametrize("labels", ["a number tree without numbers", "not a dictionary"])
def test_a_pdf_with_broken_page_labels_still_loads(pdf_bytes, labels: str) -> None:
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import (
        ArrayObject,
        DictionaryObject,
        NameObject,
        NumberObject,
        TextStringObject,
    )

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes(["only page"]))))
    writer._root_object[NameObject("/PageLabels")] = NumberObject(7) if labels == \
        "not a dictionary" else DictionaryObject(
            {NameObject("/Nums"): ArrayObject([TextStringObject("x")])})
    buf = io.BytesIO()
    writer.write(buf)
    (page,) = load_document(buf.getvalue(), "broken-labels.pdf", LIMITS).blocks
    assert (page.page, page.text.strip()) == (1, "only page")
    assert page.page_label in (None, "1")  # pypdf's default label, or none


@pytest.mark.parametrize(("html", "expected"), [
    (b"<html><body><div><p>unclosed <b>bold <pre>code\n  x", ["unclosed bold\n\ncode\n  x"]),
    (b"<div>" * 20_000 + b"deep text" + b"</div>" * 20_000, ["deep text"]),
])
def test_malformed_html_loads_what_it_can(html: bytes, expected: list[str]) -> None:
    assert [b.text for b in load_document(html, "bad.html", LIMITS).blocks] == expected


def test_html_of_navigation_only_says_so() -> None:
    with pytest.raises(LoaderError, match="no text found outside navigation"):
        load_document(b"<nav><a href='/'>Home</a></nav><script>x()</script>", "n.html",
                      LIMITS)


def test_a_man_page_is_titled_by_its_name_line_and_every_chunk_is_embedded_under_it() -> None:
    doc = _load("git-cat-file.html")
    # the NAME line sits in the page's header, outside #content; <title> is "git-cat-file(1)"
    assert doc.title == ("git-cat-file - Provide content or type and size information for "
                         "repository objects")
    options = next(b for b in doc.blocks if b.heading == "OPTIONS")
    assert embedding_text(doc.title, options.heading, "-p").startswith(
        f"{doc.title} > OPTIONS\n")


@pytest.mark.parametrize(("title", "heading", "context"), [
    # a Sphinx page: the path's first part is the title without the site's suffix
    ("json — JSON encoder and decoder — Python 3.11.2 documentation",
     "json — JSON encoder and decoder > Basic Usage", "json — JSON encoder and decoder > "
     "Basic Usage"),
    ("Guide", "Guide > Install", "Guide > Install"),  # Markdown: the title is the h1
    ("Introduction to TeX", "Introduction > Boxes", "Introduction to TeX > Introduction > "
     "Boxes"),  # a heading that only starts like the title is not it
    ("amsldoc", "", "amsldoc"),  # a PDF: no headings
    ("", "Usage", "Usage"),
])
def test_the_embedder_sees_the_title_unless_the_heading_path_already_names_it(
        title: str, heading: str, context: str) -> None:
    assert embedding_text(title, heading, "chunk") == f"{context}\nchunk"
    assert embedding_text("", "", "chunk") == "chunk"


def test_chunks_end_between_definition_list_entries(services) -> None:
    count = services.embedder.count_tokens
    html = (b"<html><body><h2>OPTIONS</h2><p>Options of the tool.</p><dl>"
            b"<dt>--autostash</dt><dt>--no-autostash</dt><dd><p>Create a temporary stash "
            b"entry before the operation begins.</p></dd>"
            b"<dt>--quiet</dt><dd><p>Be quiet, only report errors.</p></dd></dl></body></html>")
    doc = load_document(html, "tool.html", IngestionSettings())
    # one entry per term group: --autostash and --no-autostash are one entry
    assert [(b.text.split("\n")[0], b.joins) for b in doc.blocks] == [
        ("Options of the tool.", False), ("--autostash", True), ("--quiet", True)]
    # terms on the lines above their description: a cut at blank lines never parts them
    assert doc.blocks[1].text == ("--autostash\n--no-autostash\nCreate a temporary stash "
                                  "entry before the operation begins.")
    whole = chunk_blocks(doc.blocks, count, 200, 32)  # all fit: one chunk, offsets kept
    assert len(whole) == 1 and whole[0].heading == "OPTIONS"
    text = "\n\n".join(b.text for b in doc.blocks)
    assert text[whole[0].start_char:whole[0].end_char] == whole[0].text
    entry = count(doc.blocks[1].text)
    small = chunk_blocks(doc.blocks, count, entry + 2, 4)  # room for one entry a chunk
    assert [c.text for c in small[1:]] == [b.text for b in doc.blocks[1:]]


def test_real_options_and_functions_are_never_cut_when_they_fit(services) -> None:
    count = services.embedder.count_tokens
    for name in ("git-cat-file.html", "python-json.html"):
        blocks = _load(name).blocks
        entries = [b for b in blocks if b.joins and count(b.text) <= 200]
        assert len(entries) >= 10, name
        chunks = chunk_blocks(blocks, count, 200, 32)
        for b in entries:
            assert any(b.text in c.text for c in chunks), b.text[:60]
