"""A source opened where the answer is: a PDF at its page, drawn with the passage shaded and
the copied words marked; any other document as escaped text around the passage, marked
the same way. Documents are never rendered as HTML: a page is an image, text is text."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import streamlit as st

from rag_app.citations import page_reference
from rag_app.errors import LoaderError
from rag_app.originals import Opened, available, open_source
from rag_app.passages import find_page, locate, pdf_page_count, render_pdf_page, window
from ui import render, state

MB = 1024 * 1024
BEFORE, AFTER = 600, 2500  # characters of context shown around a text passage


def problem(source: dict[str, Any]) -> str | None:
    """Why the card's document cannot be opened now (gone from disk, not kept), or None."""
    services = state.services()
    return available(services.store.originals, _collection(), str(source["source"]))


def open_label(source: dict[str, Any]) -> str:
    ref = page_reference(source.get("page"), source.get("page_label"))
    return f"Open at {ref}" if ref else "Open at the passage"


@st.dialog("Source", width="large")
def show(source: dict[str, Any], spans: list[str]) -> None:
    """The dialog of one source card; `spans` are the words the answer copied from it."""
    name = PurePath(str(source["source"])).name
    st.markdown(f"**{render.escape_markdown(name)}**")
    opened = _open(source)
    if opened.data is None:
        st.warning(render.escape_markdown(opened.problem or "cannot be opened"),
                   icon=":material/link_off:")
        return
    if opened.changed:
        st.caption("The document changed since it was ingested: the passage may have moved.")
    if name.lower().endswith(".pdf"):
        _pdf(source, opened, spans)
    else:
        _text(source, opened, spans)


def _collection() -> str:
    return state.collection(state.settings().collection)


def _open(source: dict[str, Any]) -> Opened:
    services = state.services()
    return open_source(services.store.originals, _collection(), str(source["source"]),
                       source.get("doc_hash"), int(services.settings.ingestion.max_file_mb * MB))


@st.cache_data(max_entries=16, show_spinner=False)
def _page_png(key: str, _data: bytes, page: int, passage: str, spans: tuple[str, ...]
              ) -> tuple[bytes, int, bool, int]:
    """A rendered page, cached by the document's content hash (`key`), not its bytes."""
    image = render_pdf_page(_data, page, passage, list(spans))
    return image.png, image.pages, image.passage_found, image.spans_found


def _pdf(source: dict[str, Any], opened: Opened, spans: list[str]) -> None:
    import hashlib

    data = opened.data or b""
    try:
        pages = pdf_page_count(data)
        first = int(source.get("page") or 1)
        cited = find_page(data, first, int(source.get("page_end") or first), spans)
    except Exception as e:  # noqa: BLE001 - PDFium's errors have no common base: report them
        st.error(render.escape_markdown(f"cannot read this PDF: {e}"))
        return
    page = st.number_input("PDF page", 1, pages, min(cited, pages),
                           help=f"The cited page is PDF page {cited}; the document has "
                           f"{pages} pages.")
    key = hashlib.sha256(data).hexdigest()
    passage = source["text"] if page in (first, cited) else ""
    png, _, found, marked = _page_png(key, data, int(page), passage,
                                      tuple(spans) if page == cited else ())
    label = source.get("page_label") if page == first else None
    st.caption(render.escape_markdown(page_reference(int(page), label)) + " · " + (
        _marks_caption(found, marked, bool(spans)) if page in (first, cited)
        else "another page than the cited one"))
    st.image(png, width="stretch")
    st.download_button("Download the PDF", data, file_name=PurePath(
        str(source["source"])).name, mime="application/pdf", icon=":material/download:")


def _marks_caption(found: bool, marked: int, copied: bool) -> str:
    if not found and not marked:
        return ("the passage is not in this page's text layer (a scanned page?): nothing "
                "is marked")
    words = (f"the copied words outlined ({marked})" if marked else
             "the copied words are not in the text layer" if copied else "")
    return "the passage shaded" + (f", {words}" if words else "")


def _text(source: dict[str, Any], opened: Opened, spans: list[str]) -> None:
    name = PurePath(str(source["source"])).name
    try:
        doc = state.services().parser.parse(opened.data or b"", name)
    except LoaderError as e:
        st.error(render.escape_markdown(f"cannot read it: {e}"))
        return
    text = "\n\n".join(b.text for b in doc.blocks)
    located = locate(text, source["text"], spans)
    start, end = window(located, BEFORE, AFTER)
    if not located.passage:
        st.caption("The passage is not in the document as it is now: its start is shown.")
    else:
        st.caption("The passage is shaded" + (", the copied words marked" if located.spans
                                              else "") + f" ({start:,}–{end:,} of "
                   f"{len(text):,} characters shown)")
    marks = ([(a, b, "passage") for a, b in located.passage]
             + [(a, b, "span") for a, b in located.spans])
    with st.container(height=480, border=True):
        st.markdown(render.marked(text[start:end], [(a - start, b - start, k)
                                                     for a, b, k in marks]))
