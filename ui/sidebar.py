"""Sidebar: collection, retrieval and decoding controls, stored as per-request options."""

from __future__ import annotations

import streamlit as st

from rag_app.factory import Services
from rag_app.settings import collection_problem
from ui import state


def render(services: Services) -> None:
    s = services.settings
    opts = state.options()
    with st.sidebar:
        st.header("Settings")
        known = services.store.collections() or [s.collection]
        if s.collection not in known:
            known.insert(0, s.collection)
        current = state.collection(s.collection)
        if current not in known:
            known.append(current)
        chosen = st.selectbox("Collection", known, index=known.index(current))
        new = st.text_input("New collection", placeholder="name, then Enter",
                            help="ASCII letters, digits, '_', '-' or '.'; created by its "
                            "first upload.")
        problem = collection_problem(new) if new else None
        if new and problem is None:
            chosen = new
        elif problem:
            st.error(problem.replace("collection must", "A collection name must", 1))
        st.session_state["collection"] = chosen
        st.subheader("Retrieval")
        opts["mode"] = st.radio("Mode", ["hybrid", "vector", "fulltext"], horizontal=True,
                                index=["hybrid", "vector", "fulltext"].index(s.retrieval.mode))
        opts["k"] = st.slider("Passages (k)", 1, 10, s.retrieval.k)
        opts["mmr"] = st.toggle("Diversify passages (MMR)", s.retrieval.mmr,
                                help="Maximal marginal relevance: skip near-duplicate passages.")
        has_reranker = bool(s.retrieval.rerank_model)
        opts["rerank"] = st.toggle(
            "Rerank with a cross-encoder", s.retrieval.rerank, disabled=not has_reranker,
            help=f"Rescore the candidates with {s.retrieval.rerank_model}." if has_reranker
            else "Set retrieval.rerank_model (RAG_RETRIEVAL__RERANK_MODEL) to a cross-encoder "
            "to enable reranking.")
        st.subheader("Decoding")
        g = s.generation
        local = s.llm.provider == "local"  # a model server takes no beams, no top-k
        strategy = st.radio("Strategy", ["greedy", "sampling", "beam search"][:3 if local else 2],
                            horizontal=True, help="Greedy is reproducible; sampling varies; "
                            "beams are not streamed.")
        opts["do_sample"] = strategy == "sampling"
        opts["num_beams"] = st.slider("Beams", 2, 8, 4) if strategy == "beam search" else 1
        if strategy == "sampling":
            opts["temperature"] = st.slider("Temperature", 0.05, 2.0, g.temperature, 0.05)
            if local:
                opts["top_k"] = st.slider("Top-k (0 = off)", 0, 200, g.top_k)
            opts["top_p"] = st.slider("Top-p", 0.05, 1.0, g.top_p, 0.05)
            seed = st.number_input("Seed (-1 = random)", -1, 2**31 - 1, g.seed or -1)
            opts["seed"] = None if seed < 0 else int(seed)
        opts["max_new_tokens"] = st.slider("Max new tokens", 16, 1024, g.max_new_tokens, 16)
        st.session_state["show_confidence"] = st.toggle(
            "Colour answers by confidence", help="Each token's probability under the model.")
