"""GPT lab: BPE tokens, the next-token distribution under temperature / top-k / top-p,
step-by-step decoding, and the causal attention mask and weights."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from rag_app import lab
from ui import render, sidebar, state

services = state.services()
sidebar.render(services)
st.title("GPT lab")
if services.settings.llm.provider != "local":
    st.info("The GPT lab looks inside a local model; the answers come from the model server "
            f"at {services.chat_model.lm.url} (llm.provider = openai).")
    st.stop()
with st.spinner("Loading the model…"):
    lm = services.lm
st.caption(f"Look inside the local decoder-only model that writes the answers "
           f"({lm.name.rsplit('/', 1)[-1]}, {lm.dtype_name}).")
history = state.messages()
last = next((m["content"] for m in reversed(history) if m["role"] == "user"), None)
if "lab_text" not in st.session_state:
    st.session_state["lab_text"] = last or "The causal mask lets each token attend to"
if last and st.button("Use my last question"):
    st.session_state["lab_text"] = last
text = st.text_area("Prompt", key="lab_text", height=90)
if not text.strip():
    st.info("Type some text to see its tokens.")
    st.stop()

st.subheader("1 · BPE tokens")
pieces = lab.tokens(lm, text)
colours = ["blue", "green", "orange", "violet", "red", "gray"]
st.markdown(" ".join(f":{colours[i % len(colours)]}-background[{render.escape_markdown(p)}]"
                     for i, (p, _) in enumerate(pieces[:2000])))
st.caption(f"{len(pieces)} tokens · ids: {' '.join(str(i) for _, i in pieces[:2000])}"
           f"{' …' if len(pieces) > 2000 else ''}")
if cut := lab.over_context(lm, len(pieces)):
    st.warning(f"The prompt is longer than the model's context of {lm.context_length} "
               f"tokens: it reads the last {lm.context_length}, not the first {cut}.")

st.subheader("2 · Next-token distribution")
c1, c2, c3 = st.columns(3)
temperature = c1.slider("Temperature", 0.05, 2.0, 1.0, 0.05, key="lab_t")
top_k = c2.slider("Top-k (0 = off)", 0, 50, 0, key="lab_k")
top_p = c3.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="lab_p")
cands = lab.next_token(lm, text, temperature, top_k, top_p)
frame = pd.DataFrame([{"token": repr(c.token), "raw": c.prob, "after temperature/top-k/top-p":
                       c.processed} for c in cands])
long = frame.melt("token", var_name="distribution", value_name="probability")
st.altair_chart(alt.Chart(long).mark_bar().encode(
    x=alt.X("token:N", sort=None), y="probability:Q", color="distribution:N",
    xOffset="distribution:N"), width="stretch")
kept = sum(c.processed > 0 for c in cands)
st.caption(f"{kept} of the top {len(cands)} candidates survive the cuts; bars renormalise.")

st.subheader("3 · Step through generation")


def append_token(sample: bool) -> None:
    """Runs before the next rerun, so the prompt widget shows the longer text."""
    current = st.session_state["lab_text"]
    chosen = lab.step(lm, current, sample, temperature, top_k, top_p)
    st.session_state["lab_text"] = current + chosen.token


b1, b2, b3 = st.columns(3)
b1.button("Append greedy token", on_click=append_token, args=(False,))
b2.button("Append sampled token", on_click=append_token, args=(True,))
b3.caption("Greedy takes the top bar; sampling draws from the processed distribution.")

st.subheader("4 · Causal attention")
layers, heads = lab.shape(lm)
window = pieces[-24:]  # keep the heatmap readable
labels = [f"{i}:{p!r}" for i, (p, _) in enumerate(window)]
show_weights = st.toggle("Show attention weights of a layer and head")
if show_weights:
    l1, l2 = st.columns(2)
    layer = l1.slider("Layer", 0, layers - 1, layers - 1)
    head = l2.slider("Head", 0, heads - 1, 0)
    matrix = lab.attention(lm, "".join(p for p, _ in window), layer, head)
else:
    matrix = lab.causal_mask(len(window))
cells = pd.DataFrame([{"query": labels[i], "key": labels[j], "weight": float(matrix[i, j])}
                      for i in range(len(labels)) for j in range(len(labels))])
st.altair_chart(alt.Chart(cells).mark_rect().encode(
    x=alt.X("key:N", sort=labels), y=alt.Y("query:N", sort=labels),
    color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues")),
    tooltip=["query", "key", "weight"]), width="stretch")
st.caption("Row i shows what token i attends to; everything right of the diagonal is masked "
           "(a decoder-only GPT never looks ahead).")
