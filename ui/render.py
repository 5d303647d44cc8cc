"""Small rendering components. Document text and file names are always shown as text."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

import streamlit as st

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def escape_markdown(text: str) -> str:
    """Make arbitrary text inert in st.markdown: no links, HTML, formatting or math."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def source_title(s: dict[str, Any], cited: bool) -> str:
    name = PurePath(str(s["source"])).name
    page = f", p. {s['page']}" if s.get("page") is not None else ""
    mark = "cited" if cited else "retrieved"
    return f"[{s['n']}] {name}{page} · {mark} · score {s['score']:.3f}"


def source_cards(sources: list[dict[str, Any]], cited: list[int]) -> None:
    if not sources:
        return
    st.caption(f"Sources ({len(sources)} retrieved, {len(cited)} cited)")
    for s in sources:
        with st.expander(escape_markdown(source_title(s, s["n"] in cited))):
            if s.get("heading"):
                st.caption(escape_markdown(s["heading"]))
            st.markdown(escape_markdown(s["text"]))
            st.caption(escape_markdown(str(s["source"])))


def answer_caption(answer: dict[str, Any]) -> None:
    t = answer["timings"]
    st.caption(
        f"{answer.get('model')} on {answer.get('device')} · retrieval {t['retrieve_ms']:.0f} ms"
        f" · first token {t['first_token_ms']:.0f} ms · {t['tokens_per_s']:.1f} tokens/s")


def past_answer(answer: dict[str, Any]) -> None:
    if answer["found"]:
        st.markdown(answer["answer"])
    else:
        st.warning(answer["answer"], icon=":material/search_off:")
    source_cards(answer["sources"], answer["cited"])
    answer_caption(answer)
