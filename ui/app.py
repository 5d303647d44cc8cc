"""Streamlit entry point: `rag ui` (or `streamlit run ui/app.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` from a clone

from ui import state  # noqa: E402 - imports the library once, before any page
from ui.gate import guard  # noqa: E402

st.set_page_config(page_title="rag_app", page_icon=":material/menu_book:", layout="wide")
guard(state.settings().ui)  # the Host check and sign-in, before any page
# Each page renders the sidebar itself (see ui/sidebar.py), so a page also runs on its own.
pages = [
    st.Page("views/chat.py", title="Chat", icon=":material/chat:", default=True),
    st.Page("views/documents.py", title="Documents", icon=":material/folder_open:"),
    st.Page("views/lab.py", title="GPT lab", icon=":material/science:"),
]
st.navigation(pages).run()
