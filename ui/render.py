"""Small rendering components. Document text, file names and model output are escaped, so
they always show as text (never HTML, links or formatting)."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

import streamlit as st

from rag_app.citations import page_reference

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:=^])")
_STOP = {"the", "and", "for", "are", "was", "what", "which", "how", "does", "with", "that",
         "this", "from", "have", "has", "who", "when", "where", "why", "many", "much", "into"}
CITED, MATCHED, RETRIEVED = "blue", "violet", "gray"


# Streamlit's Markdown turns bare URLs, `www.` names and e-mail addresses in plain text into
# live links after escapes are resolved (GFM autolink literals), so escaping cannot stop
# them: an invisible word joiner inside each pattern does.
_AUTOLINK = re.compile(r"(?i)(?<=:)(?=//)|(?<=www)(?=\.)|(?<=@)")
_JOINER = "\u2060"


def escape_markdown(text: str) -> str:
    """Make arbitrary text inert in st.markdown: no links, HTML, formatting or math."""
    text = _AUTOLINK.sub(_JOINER, text)
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


def badge(n: int, cited: bool, matched: bool = False) -> str:
    return f":{CITED if cited else MATCHED if matched else RETRIEVED}-badge[{n}]"


def answer_markdown(text: str, n_sources: int) -> str:
    """The answer as inert text, with each valid [n] turned into its source's badge."""
    escaped = escape_markdown(text)
    return re.sub(r"\\\[(\d+)\\\]", lambda m: badge(int(m[1]), True)
                  if 1 <= int(m[1]) <= n_sources else m[0], escaped)


def confidence_markdown(tokens: list[dict[str, Any]]) -> str:
    """Each answer token on a background coloured by the model's probability for it."""
    def colour(p: float) -> str:
        return "green" if p >= 0.7 else "orange" if p >= 0.3 else "red"
    return "".join(f":{colour(t['prob'])}-background[{escape_markdown(t['text'])}]"
                   if t["text"].strip() else escape_markdown(t["text"]) for t in tokens)


def highlight(text: str, query: str) -> str:
    """Escape `text` and mark the query's content words in it."""
    terms = {w for w in re.findall(r"\w+", query.lower()) if len(w) > 2 and w not in _STOP}
    if not terms:
        return escape_markdown(text)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(terms))) + r")\w*",
                         re.IGNORECASE)
    out, last = [], 0
    for m in pattern.finditer(text):
        out += [escape_markdown(text[last:m.start()]),
                f":orange-background[{escape_markdown(m[0])}]"]
        last = m.end()
    return "".join(out) + escape_markdown(text[last:])


def copied(text: str, spans: list[dict[str, Any]]) -> str:
    """Escape `text` and mark the spans a grounded answer copied from it."""
    out, last = [], 0
    for span in sorted(spans, key=lambda x: x["start"]):
        if span["start"] < last or span["end"] > len(text):
            continue  # offsets of another text: never mark the wrong words
        out += [escape_markdown(text[last:span["start"]]),
                f":blue-background[{escape_markdown(text[span['start']:span['end']])}]"]
        last = span["end"]
    return "".join(out) + escape_markdown(text[last:])


_MARK = {"passage": "yellow-background", "span": "orange-background"}


def marked(text: str, marks: list[tuple[int, int, str]]) -> str:
    """Escape `text` and mark its (start, end, kind) ranges, kind "passage" or "span" (a
    span wins where both are). Marked line by line: a directive cannot hold a line break."""
    kinds = [""] * len(text)
    for kind in ("passage", "span"):
        for start, end, k in marks:
            for i in range(max(0, start), min(end, len(text))) if k == kind else ():
                kinds[i] = kind
    out, at = [], 0
    while at < len(text):
        stop = at
        while stop < len(text) and kinds[stop] == kinds[at] and text[stop] != "\n":
            stop += 1
        if stop == at:  # a line break
            out.append(escape_markdown(text[at]))
            at += 1
            continue
        piece = escape_markdown(text[at:stop])
        out.append(f":{_MARK[kinds[at]]}[{piece}]" if kinds[at] and text[at:stop].strip()
                   else piece)
        at = stop
    return "".join(out)


def source_title(s: dict[str, Any], cited: bool, matched: bool = False,
                 grounded: bool = False) -> str:
    name = escape_markdown(PurePath(str(s["source"])).name)
    ref = page_reference(s.get("page"), s.get("page_label"))
    page = f", {escape_markdown(ref)}" if ref else ""  # a label is the PDF's text
    mark = ("the answer is copied from here" if grounded else "cited" if cited
            else "matched to the answer" if matched else "retrieved")
    similarity = s.get("similarity")
    match = f" · similarity {similarity:.2f}" if similarity is not None else ""
    return f"{badge(s['n'], cited, matched)} {name}{page} · {mark}{match}"


def source_cards(sources: list[dict[str, Any]], cited: list[int], query: str = "",
                 matched: list[int] | None = None,
                 spans: list[dict[str, Any]] | None = None) -> None:
    """One card per source; a grounded answer's source opens with the copied words marked,
    the others with the query's words marked. The cards of a finished answer (`spans`
    given, even empty) each open their document at the passage; those shown while an
    answer streams do not (a click reruns the page, which would drop the answer)."""
    if not sources:
        return
    openable = spans is not None
    matched, spans = matched or [], spans or []
    also = f", {len(matched)} matched to the uncited answer" if matched else ""
    if spans:
        st.caption(f"Sources: {len(sources)} retrieved; the answer is copied word for word "
                   "from the marked passage")
    else:
        st.caption(f"Sources: {len(sources)} retrieved, {len(cited)} cited by the model{also}")
    for s in sources:
        own = [x for x in spans if x["n"] == s["n"]]
        with st.expander(source_title(s, s["n"] in cited, s["n"] in matched, bool(own)),
                         expanded=bool(own)):
            if s.get("heading"):
                st.caption(escape_markdown(s["heading"]))
            st.markdown(copied(s["text"], own) if own else highlight(s["text"], query))
            st.caption(escape_markdown(str(s["source"])))
            if openable:
                _open_button(s, own, key=f"open-{id(sources)}-{s['n']}")


def _open_button(s: dict[str, Any], own: list[dict[str, Any]], key: str) -> None:
    """Open the card's document at the passage, or say why it cannot be."""
    from ui import source_view  # the viewer's imports (PDFium) only where cards are opened

    why = source_view.problem(s)
    if why:
        st.caption(escape_markdown(f"Cannot be opened: {why}"))
    elif st.button(source_view.open_label(s), key=key, icon=":material/open_in_new:"):
        source_view.show(s, [s["text"][x["start"]:x["end"]] for x in own
                             if x["end"] <= len(s["text"])])


def answer_caption(answer: dict[str, Any]) -> None:
    t = answer["timings"]
    if not answer["found"] and not t.get("generate_ms"):
        st.caption(f"retrieval {t['retrieve_ms']:.0f} ms · the model was not called")
        return
    waited = t.get("queue_ms", 0) >= 50  # another session's generation came first
    queued = f"waited {t['queue_ms'] / 1000:.1f} s for the model · " if waited else ""
    where = (f"on {answer.get('device')} ({escape_markdown(str(answer.get('dtype')))})"
             if answer.get("dtype") else f"· {escape_markdown(str(answer.get('engine')))}")
    st.caption(
        f"{escape_markdown(str(answer.get('model')))} {where} · "
        f"retrieval {t['retrieve_ms']:.0f} ms · {queued}first token "
        f"{t['first_token_ms']:.0f} ms · {t['tokens_per_s']:.1f} tokens/s")


def answer_body(answer: dict[str, Any], confidence: bool = False) -> None:
    if not answer["found"]:
        reason = f" (why: {answer['refusal']})" if answer.get("refusal") else ""
        st.warning(answer["answer"] + reason, icon=":material/search_off:")
    elif confidence and answer.get("tokens"):
        st.markdown(confidence_markdown(answer["tokens"]))
        st.caption("Background: the model's probability for each token "
                   "(green ≥ 0.7, orange ≥ 0.3, red below).")
    else:
        st.markdown(answer_markdown(answer["answer"], len(answer["sources"])))
    if answer["found"] and answer.get("matched"):
        st.caption("Not cited by the model, but its words are in "
                   + " ".join(badge(n, False, True) for n in answer["matched"]))


def past_answer(answer: dict[str, Any], confidence: bool = False) -> None:
    if answer.get("query") and answer["query"] != answer.get("question"):
        st.caption(escape_markdown(f"Searched for: {answer['query']}"))
    answer_body(answer, confidence)
    source_cards(answer["sources"], answer["cited"], answer.get("query", ""),
                 answer.get("matched"), answer.get("spans"))
    answer_caption(answer)
