"""A LangChain `BaseRetriever` over the LanceDB chunk store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from lancedb.rerankers import Reranker
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores.utils import maximal_marginal_relevance
from pydantic import ConfigDict, ValidationError

from rag_app.embeddings import Embedder
from rag_app.errors import SettingsError
from rag_app.fusion import fusion_reranker
from rag_app.settings import RetrievalSettings, format_validation_error
from rag_app.store import ChunkStore, Hit, sql_string


def hit_to_document(hit: Hit) -> Document:
    meta = {**hit.metadata, "score": hit.score, "similarity": hit.similarity}
    return Document(page_content=hit.text, metadata=meta, id=meta.get("id"))


class LanceRetriever(BaseRetriever):
    """Vector, full-text or hybrid search in one collection.

    Per-call overrides as keyword arguments: `k`, `mode`, `min_similarity`, `mmr`,
    `mmr_lambda`, `fetch_k`, and the filters `source` (a document) and `page` (a page number).
    Chunks whose cosine similarity to the query is below `min_similarity` are dropped, so an
    unrelated question retrieves nothing rather than noise.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: ChunkStore
    embedder: Embedder
    collection: str
    settings: RetrievalSettings
    reranker: Callable[[], Reranker] | None = None  # built on first use of `rerank`

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        opts = self.settings.model_copy(
            update={k: v for k, v in kwargs.items()
                    if k in RetrievalSettings.model_fields and v is not None})
        try:
            opts = RetrievalSettings.model_validate(opts.model_dump())
        except ValidationError as e:
            raise SettingsError(format_validation_error(e, "retrieval")) from e
        vector = self.embedder.embed_query(query)
        # Settings validation guarantees a rerank_model, hence a reranker, when rerank is on.
        reranker = self.reranker() if opts.rerank and self.reranker else None
        fuse = fusion_reranker(opts) if reranker is None and opts.mode == "hybrid" else None
        pool = max(opts.k, opts.fetch_k)  # what MMR and the reranker choose the k from
        hits = self.store.search(
            kwargs.get("collection") or self.collection, query, vector,
            pool if opts.mmr else opts.k, opts.mode,
            filters(kwargs.get("source"), kwargs.get("page")), reranker or fuse,
            candidates=pool if reranker else None)
        hits = [h for h in hits if h.similarity >= opts.min_similarity]
        if opts.mmr and len(hits) > 1:  # MMR orders the picks too, also when it keeps them all
            # LangChain's MMR: each next pick balances relevance against the picks so far.
            picked = maximal_marginal_relevance(
                np.asarray(vector), [h.vector for h in hits], opts.mmr_lambda, opts.k)
            hits = [hits[i] for i in picked]
        return [hit_to_document(h) for h in hits[:opts.k]]


def filters(source: str | None, page: int | None) -> str | None:
    """A LanceDB SQL filter: one document, and/or chunks covering one page."""
    clauses = []
    if source:
        clauses.append(f"source = {sql_string(source)}")
    if page is not None:
        clauses.append(f"(page = {int(page)} OR (page <= {int(page)} "
                       f"AND page_end >= {int(page)}))")
    return " AND ".join(clauses) or None
