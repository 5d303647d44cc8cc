"""Documents page: upload files into the current collection, list and delete documents."""

from __future__ import annotations

import streamlit as st

from ingest.pipeline import FileResult, SourceFile, uploaded
from rag_app.errors import RagError
from ui import render, sidebar, state
from ui.upload_progress import UploadProgress

services = state.services()
sidebar.render(services)
settings = services.settings
collection = state.collection(settings.collection)

st.title("Documents")
st.caption(render.escape_markdown(f"Collection {collection} at {settings.db_uri}"))

uploads = st.file_uploader("Add documents", accept_multiple_files=True,
                           help="txt, md, pdf, html, docx, csv, or a zip of these")
replace = st.checkbox("Replace documents of the same name",
                      help="Otherwise a file named like a different document already in the "
                      "collection (another user's report.md, say) is reported, not stored "
                      "over it.")
if uploads and st.button("Ingest", type="primary", icon=":material/upload:"):
    files: list[SourceFile | FileResult] = [
        uploaded(up.name, up.size, up.getvalue, settings.ui.max_upload_mb) for up in uploads]
    shown = UploadProgress(len(files))
    try:
        report = services.ingestor().ingest(files, collection, shown.file_done,
                                            replace=replace, steps=shown.step)
    except RagError as e:
        st.error(str(e))
        st.stop()
    summary = report.to_json()
    (st.warning if report.failed else st.success)(
        f"{summary['ingested']} ingested ({summary['chunks']} chunks), "
        f"{summary['unchanged']} unchanged, {len(report.failed)} failed"
        + (f", {len(report.skipped)} skipped" if report.skipped else ""))
    st.dataframe([{"file": r.path, "result": r.status, "chunks": r.chunks,
                   "error": r.error or ""} for r in report.results], hide_index=True)
    for r in report.failed:
        st.error(render.escape_markdown(f"{r.path}: {r.error}"))

try:
    docs = services.store.documents(collection)
except RagError as e:
    st.error(str(e))
    st.stop()
if not docs:
    st.info("No documents yet: upload some above, or run `rag ingest PATH`.")
    st.stop()
st.dataframe([{k: d[k] for k in ("source", "title", "chunks", "pages", "ingested_at")}
              for d in docs], hide_index=True, width="stretch")
chosen = st.multiselect("Delete documents", [d["source"] for d in docs])
if chosen and st.button("Delete selected", icon=":material/delete:"):
    n = services.store.delete_documents(collection, chosen)
    st.toast(f"Deleted {len(chosen)} documents ({n} chunks).")
    st.rerun()
