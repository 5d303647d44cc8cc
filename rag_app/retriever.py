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
from pydantic import ConfigDict, ValidationError, model_validator

from rag_app.embeddings import Embedder
from rag_app.errors import SettingsError
from rag_app.fusion import fusion_reranker
from rag_app.settings import MAX_PAGE, RetrievalSettings, format_validation_error
from rag_app.store import ChunkStore, Hit, sql_string

OVERRIDES = ("k", "mode", "min_similarity", "mmr", "mmr_lambda", "fetch_k", "rerank", "source",
             "page")


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

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # no typo passes

    store: ChunkStore
    embedder: Embedder
    collection: str
    settings: RetrievalSettings
    reranker: Callable[[], Reranker] | None = None  # built on first use of `rerank`
    # Constructor overrides of `settings` (None: the setting's value), as in
    # LanceRetriever(..., k=3); keyword arguments of a call override both.
    k: int | None = None
    mode: str | None = None
    min_similarity: float | None = None
    mmr: bool | None = None
    mmr_lambda: float | None = None
    fetch_k: int | None = None
    rerank: bool | None = None
    source: str | None = None
    page: int | None = None

    @model_validator(mode="after")
    def _valid_overrides(self) -> LanceRetriever:
        self._options({})  # a bad k or mode fails here, naming the setting
        return self

    def _options(self, kwargs: dict[str, Any]) -> tuple[RetrievalSettings, dict[str, Any]]:
        given = {name: getattr(self, name) for name in OVERRIDES}
        given.update(kwargs)
        given = {k: v for k, v in given.items() if v is not None}
        opts = self.settings.model_copy(
            update={k: v for k, v in given.items() if k in RetrievalSettings.model_fields})
        try:
            return RetrievalSettings.model_validate(opts.model_dump()), given
        except ValidationError as e:
            raise SettingsError(format_validation_error(e, "retrieval")) from e

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        opts, kwargs = self._options(kwargs)
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
        if not 1 <= int(page) <= MAX_PAGE:
            raise SettingsError(f"page must be between 1 and {MAX_PAGE} (pages are "
                                f"numbered from 1), not {page}")
        clauses.append(f"(page = {int(page)} OR (page <= {int(page)} "
                       f"AND page_end >= {int(page)}))")
    return " AND ".join(clauses) or None
