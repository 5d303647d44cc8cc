"""Finding a passage and an answer's copied span in its document, and drawing them on a
real PDF page (tests/corpus: amsldoc's printed page 25 is its PDF page 3)."""

import io
from pathlib import Path

from PIL import Image

from ingest.loaders import load_document
from rag_app.passages import find_page, locate, render_pdf_page, window
from rag_app.settings import IngestionSettings

PDF = Path(__file__).resolve().parent / "corpus" / "amsldoc-pages.pdf"


def test_a_copied_span_is_marked_on_its_pdf_page_though_the_extractors_differ() -> None:
    data = PDF.read_bytes()
    doc = load_document(data, PDF.name, IngestionSettings())
    block = next(b for b in doc.blocks if "poor man" in b.text)
    assert (block.page, block.page_label) == (3, "25")
    passage = block.text[:900]
    span = passage[passage.index("“pmb” stands"):passage.index("bold”") + 5]
    assert find_page(data, 2, 3, [span]) == 3
    page = render_pdf_page(data, 3, passage, [span], width_px=600)
    assert (page.page, page.pages, page.passage_found, page.spans_found) == (3, 3, True, 1)
    image = Image.open(io.BytesIO(page.png)).convert("RGB")
    assert image.width == 600
    # the span's mark (orange) is drawn on the page; an unmarked render has none
    plain = Image.open(io.BytesIO(render_pdf_page(data, 3, "", [], 600).png)).convert("RGB")
    assert _orange(image) > 100 and _orange(plain) == 0


def _orange(image: Image.Image) -> int:
    return sum(1 for r, g, b in image.getdata() if r > 180 and 40 < g < 100 and b < 40)


def test_a_pdf_without_page_labels_opens_at_its_physical_page(pdf_bytes) -> None:
    data = pdf_bytes(["first page about lamps", "second page about the Zorblat reactor"])
    doc = load_document(data, "plain.pdf", IngestionSettings())
    assert [(b.page, b.page_label) for b in doc.blocks][-1][0] == 2
    assert find_page(data, 1, 2, ["Zorblat reactor"]) == 2
    page = render_pdf_page(data, 2, doc.blocks[-1].text, ["Zorblat reactor"])
    assert (page.page, page.passage_found, page.spans_found) == (2, True, 1)


def test_locate_ignores_spacing_hyphens_and_case_and_prefers_the_passage() -> None:
    text = ("Intro. The value is 42 here.\n\nSection two.\nThe reactor pro-\nduces 42 "
            "giga watts, it says.\n\nMore text after.")
    found = locate(text, "The reactor produces 42 gigawatts, it says.", ["42 GIGAWATTS"])
    (start, end), = found.passage
    assert text[start:end].startswith("The reactor") and text[start:end].endswith("says")
    (a, b), = found.spans  # the 42 inside the passage, not the first one in the text
    assert text[a:b] == "42 giga watts"
    lo, hi = window(found, before=10, after=5)
    assert text[lo:hi].startswith("Section two.") and "More text after" in text[lo:hi]
    assert locate(text, "nowhere to be seen", []).passage == []
