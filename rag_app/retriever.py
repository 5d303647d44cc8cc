"""A LangChain `BaseRetriever` over the LanceDB chunk store."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from rag_app.embeddings import Embedder
from rag_app.settings import RetrievalSettings
from rag_app.store import ChunkStore, Hit, sql_string


def hit_to_document(hit: Hit) -> Document:
    meta = {**hit.metadata, "score": hit.score, "similarity": hit.similarity}
    return Document(page_content=hit.text, metadata=meta, id=meta.get("id"))


class LanceRetriever(BaseRetriever):
    """Vector, full-text or hybrid search in one collection.

    Per-call overrides as keyword arguments: `k`, `mode`, `min_similarity`, `source`.
    Chunks whose cosine similarity to the query is below `min_similarity` are dropped, so an
    unrelated question retrieves nothing rather than noise.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: ChunkStore
    embedder: Embedder
    collection: str
    settings: RetrievalSettings

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        opts = self.settings.model_copy(
            update={k: v for k, v in kwargs.items()
                    if k in RetrievalSettings.model_fields and v is not None})
        opts = RetrievalSettings.model_validate(opts.model_dump())
        source = kwargs.get("source")
        where = f"source = {sql_string(source)}" if source else None
        hits = self.store.search(
            kwargs.get("collection") or self.collection, query,
            self.embedder.embed_query(query), opts.k, opts.mode, where)
        return [hit_to_document(h) for h in hits if h.similarity >= opts.min_similarity]
