"""sentence-transformers embedder behind LangChain's `Embeddings` interface."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from langchain_core.embeddings import Embeddings
from sentence_transformers import SentenceTransformer

from rag_app.device import resolve_device
from rag_app.errors import ModelLoadError
from rag_app.locate import resolve_model_ref
from rag_app.settings import EmbeddingSettings

log = logging.getLogger(__name__)


class Embedder(Embeddings):
    """Normalised sentence embeddings (cosine similarity = dot product)."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.name = settings.model
        self.batch_size = settings.batch_size
        path = resolve_model_ref(settings.model, "embedding.model")
        device = resolve_device(settings.device)
        try:
            self.model = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"cannot load embedding model {settings.model!r} ({e}); "
                "set embedding.model (RAG_EMBEDDING__MODEL) to a local folder or cached id"
            ) from e
        # One model serves every thread (UI sessions, an ingest beside queries); the fast
        # tokenizer is not safe to call from two threads at once ("Already borrowed").
        self._lock = threading.Lock()
        self.dim: int = self.model.get_embedding_dimension()
        self.max_tokens: int = self.model.max_seq_length
        log.info("embedder %s on %s: dim %d, max %d tokens", self.name, device, self.dim,
                 self.max_tokens)

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        return self.model.tokenizer

    def count_tokens(self, text: str) -> int:
        with self._lock:
            return count_tokens(self.tokenizer, text)

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed batch by batch, taking the lock per batch, so that a query from another
        thread waits for one batch, not for a whole ingest flush."""
        texts = list(texts)
        step = self.batch_size
        out: list[list[float]] = []
        for start in range(0, len(texts), step):
            with self._lock:
                vectors = self.model.encode(
                    texts[start:start + step], batch_size=self.batch_size,
                    normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
                )
            out += vectors.tolist()
        return out

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def count_tokens(tokenizer, text: str) -> int:  # noqa: ANN001 - a transformers tokenizer
    """Tokens of `text` without special tokens: the unit chunk sizes are counted in."""
    return len(tokenizer.encode(text, add_special_tokens=False, verbose=False))
