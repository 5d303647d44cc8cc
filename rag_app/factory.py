"""The one composition root: builds every component from Settings.

Components are imported and built lazily, so `rag --help` or a settings error costs no
torch import, and a search never loads the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from rag_app.errors import SettingsError
from rag_app.settings import Settings

if TYPE_CHECKING:
    from lancedb.rerankers import Reranker

    from ingest.parser import Parser
    from ingest.pipeline import Ingestor
    from rag_app.chain import RagChain
    from rag_app.chat_model import LocalChatModel
    from rag_app.embeddings import Embedder
    from rag_app.llm import LocalLM
    from rag_app.originals import OriginalStore
    from rag_app.remote_llm import RemoteChatModel
    from rag_app.retriever import LanceRetriever
    from rag_app.store import ChunkStore
    from rag_app.vectorstore import LanceVectorStore


@dataclass
class Services:
    """Lazily built components, each built at most once."""

    settings: Settings

    @cached_property
    def embedder(self) -> Embedder:
        from rag_app.embeddings import Embedder

        return Embedder(self.settings.embedding)

    @cached_property
    def store(self) -> ChunkStore:
        from rag_app.store import ChunkStore

        # the embedder's name from the settings, its dimension on first need: listing or
        # deleting documents loads no model
        return ChunkStore(self.settings.db_uri, self.settings.embedding.model,
                          lambda: self.embedder.dim,
                          self.settings.index, self.settings.db_storage_options,
                          self.originals)

    @cached_property
    def originals(self) -> OriginalStore:
        """Uploads' original bytes, beside the database (opened on first use)."""
        from rag_app.originals import OriginalStore, originals_uri

        return OriginalStore(originals_uri(self.settings.db_uri),
                             self.settings.db_storage_options)

    @cached_property
    def lm(self) -> LocalLM:
        """The local causal LM (llm.provider = local; a model server has none here)."""
        if self.settings.llm.provider != "local":
            raise SettingsError(f"llm.provider = {self.settings.llm.provider}: the answers "
                                "come from the model server at llm.base_url, and no local "
                                "model is loaded (set llm.provider = local for this)")
        from rag_app.llm import LocalLM

        return LocalLM(self.settings.llm)

    @cached_property
    def chat_model(self) -> LocalChatModel | RemoteChatModel:
        """The generator of llm.provider: the local LM, or a model server through
        langchain-openai (which is imported only then)."""
        llm = self.settings.llm
        if llm.provider == "openai":
            from rag_app.remote_llm import RemoteChatModel, RemoteLM, build_client

            return RemoteChatModel(lm=RemoteLM(llm), client=build_client(llm),
                                   generation=self.settings.generation)
        from rag_app.chat_model import LocalChatModel

        return LocalChatModel(lm=self.lm, generation=self.settings.generation)

    @cached_property
    def parser(self) -> Parser:
        """The parser process of local ingestion (started on its first file, then reused
        by every ingest of these services, the UI's uploads included)."""
        from ingest.parser import Parser

        return Parser(self.settings.ingestion)

    def ingestor(self) -> Ingestor:
        """The ingestor of `ingestion.engine`: this process, or a Ray cluster (Ray is imported
        only then; missing Ray is a MissingDependencyError naming the extra)."""
        ingestion = self.settings.ingestion
        if ingestion.engine == "ray":
            from ingest.ray_engine import RayIngestor, require_ray

            require_ray()  # before the embedder is loaded
            return RayIngestor(self.embedder, self.store, self.settings.chunking, ingestion,
                               self.settings.embedding)
        from ingest.pipeline import Ingestor

        ui = self.settings.ui
        return Ingestor(self.embedder, self.store, self.settings.chunking, ingestion,
                        self.parser, keep_originals_mb=ui.max_upload_mb if ui.keep_originals
                        else None)

    @cached_property
    def reranker(self) -> Reranker:
        """LanceDB's cross-encoder reranker over retrieval.rerank_model (loaded on first use)."""
        from lancedb.rerankers import CrossEncoderReranker

        from rag_app.device import resolve_device
        from rag_app.locate import resolve_model_ref

        return CrossEncoderReranker(
            model_name=resolve_model_ref(self.settings.retrieval.rerank_model or "",
                                         "retrieval.rerank_model"),
            device=resolve_device(self.settings.embedding.device),
            trust_remote_code=self.settings.llm.trust_remote_code)

    def retriever(self, collection: str | None = None) -> LanceRetriever:
        from rag_app.retriever import LanceRetriever

        rerank = (lambda: self.reranker) if self.settings.retrieval.rerank_model else None
        return LanceRetriever(store=self.store, embedder=self.embedder,
                              collection=collection or self.settings.collection,
                              settings=self.settings.retrieval, reranker=rerank)

    def vectorstore(self, collection: str | None = None) -> LanceVectorStore:
        """LangChain's `VectorStore` over a collection (default: `collection`), with the
        embedder its table records; `.as_retriever(k=...)` is LangChain's retriever."""
        from rag_app.vectorstore import LanceVectorStore

        return LanceVectorStore(self.store, collection or self.settings.collection,
                                self.embedder)

    def chain(self, collection: str | None = None) -> RagChain:
        from rag_app.chain import RagChain

        return RagChain(self.retriever(collection), lambda: self.chat_model,
                        self.settings.generation, self.settings.citations,
                        self.settings.llm.model)
