"""Chat page: the sources appear once retrieved, then the answer streams token by token."""

from __future__ import annotations

from collections.abc import Iterator

import streamlit as st

from rag_app.chain import RagAnswer, Turn, Waiting, source_json
from rag_app.errors import RagError
from ui import render, sidebar, state

services = state.services()
sidebar.render(services)
history = state.messages()

st.title("Ask your documents")
try:
    with st.spinner("Loading the model (the first start converts a local one once)…"):
        # An assignment, not a bare expression: Streamlit's "magic" would render the object.
        # The local LM is loaded once per process, before the first question; a model
        # server's client costs nothing.
        _model = services.chat_model
except RagError as e:
    st.error(str(e))
    st.stop()
st.sidebar.button("Clear conversation", icon=":material/delete_sweep:",
                  on_click=state.clear_messages)

for msg in history:
    with st.chat_message(msg["role"]):
        if msg["role"] == "user":
            st.text(msg["content"])
        else:
            render.past_answer(msg["answer"], state.show_confidence())

question = st.chat_input("Ask a question about your documents")
if not question:
    st.stop()

with st.chat_message("user"):
    st.text(question)

with st.chat_message("assistant"):
    wait_box, answer_box, sources_box = st.empty(), st.empty(), st.empty()
    result: dict = {}
    try:
        chain = services.chain(state.collection(services.settings.collection))
        earlier = [Turn(m["answer"]["query"], m["answer"]["found"])
                   for m in history if m["role"] == "assistant"]
        events = chain.stream_events(question, earlier, **state.options())
        with st.spinner("Searching your documents…"):
            docs = next(events)  # the first event is always the retrieved sources
        with sources_box.container():
            render.source_cards([source_json(n, d) for n, d in enumerate(docs, 1)], [],
                                question)

        def tokens() -> Iterator[str]:
            for event in events:
                if isinstance(event, Waiting):  # other sessions are using the model
                    wait_box.info(f"Waiting for the model: {event.ahead} request(s) ahead of "
                                  "yours…", icon=":material/hourglass_top:")
                elif isinstance(event, RagAnswer):
                    result["answer"] = event.to_json()
                else:
                    wait_box.empty()
                    yield event

        beams = state.options().get("num_beams", 1) > 1
        with answer_box.container(), st.spinner(
                "Beam search (not streamed): the answer appears when it is done…"
                if beams else "Generating…"):
            # The text so far, escaped as a whole each time (not token by token, which
            # would miss a URL split across tokens): model text copied from documents
            # never becomes an image or a link while it streams.
            shown, text = st.empty(), ""
            for piece in tokens():
                text += piece
                shown.markdown(render.escape_markdown(text))
    except RagError as e:
        st.error(str(e))
        st.stop()
    answer = result["answer"]
    if answer["query"] != question:
        st.caption(render.escape_markdown(f"Searched for: {answer['query']}"))
    with answer_box.container():  # the streamed text, now with citation badges
        render.answer_body(answer, state.show_confidence())
    with sources_box.container():
        render.source_cards(answer["sources"], answer["cited"], question, answer["matched"],
                            answer["spans"])
    render.answer_caption(answer)
    history += [{"role": "user", "content": question},
                {"role": "assistant", "content": answer["answer"], "answer": answer}]
