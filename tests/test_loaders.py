import io

import pytest

from ingest.chunking import chunk_blocks
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
