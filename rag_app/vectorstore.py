"""LangChain's `VectorStore` over one collection of the LanceDB chunk store.

The same table the ingester writes and `LanceRetriever` reads: its schema, its embedding
model guard (a table built with another model is refused with `EmbeddingMismatchError`)
and its atomic writes (each `add_documents` / `delete` is one Lance commit).

Metadata round-trips: the keys that have a column of the chunk schema (source, title, page,
heading, chunk_index, ...) with a value of the column's type are stored there, so the
project's filters and citations see them; every other key (and a None) goes into the JSON
column `metadata_json`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore, VectorStoreRetriever
from langchain_core.vectorstores.utils import maximal_marginal_relevance
from pydantic import ConfigDict, Field, model_validator

from rag_app.errors import EmbeddingMismatchError, EmptyIndexError
from rag_app.store import EXTRA_COLUMN, ChunkStore, Hit, chunk_schema, filters, sql_string

# Columns a LangChain metadata key may fill: name -> (python type, smallest, largest value).
_NOT_METADATA = {"id", "text", "vector", "ingested_at", "embedding_model", EXTRA_COLUMN}


def _column_types() -> dict[str, tuple[type, int | None, int | None]]:
    out: dict[str, tuple[type, int | None, int | None]] = {}
    for f in chunk_schema(1, ""):
        if f.name in _NOT_METADATA:
            continue
        if pa.types.is_string(f.type):
            out[f.name] = (str, None, None)
        elif pa.types.is_integer(f.type):
            bits = f.type.bit_width
            out[f.name] = (int, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return out


METADATA_COLUMNS = _column_types()
# The search options each search type takes (as `search_kwargs` or retriever fields).
SEARCH_OPTIONS: dict[str, tuple[str, ...]] = {
    "similarity": ("k", "filter"),
    "similarity_score_threshold": ("k", "filter", "score_threshold"),
    "mmr": ("k", "filter", "fetch_k", "lambda_mult"),
}
Filter = dict[str, Any] | str | None


class LanceVectorStore(VectorStore):
    """A collection of the chunk store as a LangChain `VectorStore`.

    `embedding` must be the model the store was opened for (`Services.vectorstore` pairs
    them); a vector of another dimension is refused. Scores are cosine similarities.
    Search options: `k`, `filter` (a dict of column -> value or list of values, `page`
    matching chunks that cover the page, or a LanceDB SQL string) and, for MMR, `fetch_k`
    and `lambda_mult`; an unknown option is refused.
    """

    def __init__(self, store: ChunkStore, collection: str, embedding: Embeddings) -> None:
        self.store = store
        self.collection = collection
        self.embedding = embedding

    @property
    def embeddings(self) -> Embeddings:
        return self.embedding

    # -- writes ---------------------------------------------------------------------------
    def add_texts(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None = None,
                  *, ids: list[str] | None = None, **kwargs: Any) -> list[str]:
        """Embed and upsert: an id already stored is replaced. The rows of one call land
        in one atomic commit; the indexes are brought up to date after it."""
        _no_options("add_texts", kwargs)
        texts = list(texts)
        metadatas = list(metadatas) if metadatas else [{} for _ in texts]
        given = list(ids) if ids else [None] * len(texts)
        if not len(metadatas) == len(given) == len(texts):
            raise ValueError(f"add_texts got {len(texts)} texts, {len(metadatas)} metadatas "
                             f"and {len(given)} ids; give one of each per text")
        if not texts:
            return []
        out = [str(i) if i else str(uuid.uuid4()) for i in given]
        vectors = self._vectors(self.embedding.embed_documents(texts))
        now = datetime.now(UTC)
        rows: dict[str, dict[str, Any]] = {}  # a repeated id: the last one wins
        for id_, text, meta, vector in zip(out, texts, metadatas, vectors, strict=True):
            rows[id_] = {"id": id_, "text": text, "vector": vector, "ingested_at": now,
                         "embedding_model": self.store.embedding_model,
                         **_to_columns(id_, meta or {})}
        self.store.upsert_chunks(self.collection, list(rows.values()))
        # LanceRetriever's fulltext and hybrid modes need the text index (cheap when current)
        self.store.refresh_indexes(self.collection)
        return out

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete these chunks (missing ids are no error); `ids=None` is refused rather
        than emptying the collection."""
        _no_options("delete", kwargs)
        if ids is None:
            raise ValueError("LanceVectorStore.delete needs the ids to delete; it does not "
                             f"empty collection {self.collection!r} when given none (drop "
                             "the table with LanceDB to do that)")
        self.store.delete_chunks(self.collection, [str(i) for i in ids])
        return True

    # -- reads ----------------------------------------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [_document(h) for h in self.store.chunks(self.collection, [str(i) for i in ids])]

    def similarity_search(self, query: str, k: int = 4, filter: Filter = None,  # noqa: A002
                          **kwargs: Any) -> list[Document]:
        _no_options("similarity_search", kwargs)
        return [d for d, _ in self.similarity_search_with_score(query, k, filter)]

    def similarity_search_with_score(self, query: str, k: int = 4,
                                     filter: Filter = None,  # noqa: A002
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """Documents with their cosine similarity to the query, best first."""
        _no_options("similarity_search_with_score", kwargs)
        vector = self._vectors([self.embedding.embed_query(query)])[0]
        return [(_document(h), h.score) for h in self._search(vector, k, filter)]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4,
                                    filter: Filter = None,  # noqa: A002
                                    **kwargs: Any) -> list[Document]:
        _no_options("similarity_search_by_vector", kwargs)
        vector = self._vectors([embedding])[0]
        return [_document(h) for h in self._search(vector, k, filter)]

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20,
                                      lambda_mult: float = 0.5,
                                      filter: Filter = None,  # noqa: A002
                                      **kwargs: Any) -> list[Document]:
        _no_options("max_marginal_relevance_search", kwargs)
        return self.max_marginal_relevance_search_by_vector(
            self.embedding.embed_query(query), k, fetch_k, lambda_mult, filter)

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4,
                                                fetch_k: int = 20, lambda_mult: float = 0.5,
                                                filter: Filter = None,  # noqa: A002
                                                **kwargs: Any) -> list[Document]:
        """LangChain's MMR over the `fetch_k` nearest chunks."""
        _no_options("max_marginal_relevance_search_by_vector", kwargs)
        vector = self._vectors([embedding])[0]
        hits = self._search(vector, max(k, fetch_k), filter)
        if not hits:
            return []
        picked = maximal_marginal_relevance(np.asarray(vector), [h.vector for h in hits],
                                            lambda_mult, k)
        return [_document(hits[i]) for i in picked]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        """Cosine similarity as relevance, a negative one (opposite meaning) as 0."""
        return lambda similarity: min(1.0, max(0.0, similarity))

    def _search(self, vector: list[float], k: int, filter: Filter) -> list[Hit]:  # noqa: A002
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"the search option k must be a positive integer, not {k!r}")
        try:
            return self.store.search(self.collection, "", vector, k, mode="vector",
                                     where=_where(filter))
        except EmptyIndexError:  # no table yet, or an empty one: nothing is similar
            return []

    def _vectors(self, vectors: list[list[float]]) -> list[list[float]]:
        for v in vectors:
            if len(v) != self.store.dim:
                raise EmbeddingMismatchError(
                    f"the embeddings give vectors of dim {len(v)}, but collection "
                    f"{self.collection!r} is opened for embedding model "
                    f"{self.store.embedding_model!r} (dim {self.store.dim}); use the "
                    "embedding model the store was opened with (Services.vectorstore pairs "
                    "them)")
        return [[float(x) for x in v] for v in vectors]

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings,
                   metadatas: list[dict[str, Any]] | None = None, *,
                   ids: list[str] | None = None, store: ChunkStore | None = None,
                   collection: str = "default", db_uri: str | None = None,
                   embedding_model: str | None = None, **kwargs: Any) -> LanceVectorStore:
        """A store over `store` (or a database at `db_uri`, for `embedding` named
        `embedding_model`, by default its `name`) holding `texts`."""
        _no_options("from_texts", kwargs)
        if store is None:
            name = embedding_model or getattr(embedding, "name", None)
            if not db_uri or not name:
                raise ValueError("LanceVectorStore.from_texts needs store=ChunkStore(...), "
                                 "or db_uri= and embedding_model= (the name the table "
                                 "records, so another model is refused later)")
            dim = getattr(embedding, "dim", None) or len(embedding.embed_query("dimension"))
            store = ChunkStore(db_uri, name, dim)
        vs = cls(store, collection, embedding)
        vs.add_texts(texts, metadatas, ids=ids)
        return vs

    def as_retriever(self, **kwargs: Any) -> LanceVectorStoreRetriever:
        """LangChain's `VectorStoreRetriever`; the search options may also be given as
        fields (`as_retriever(k=2)`), and an unknown one is refused."""
        tags = kwargs.pop("tags", None) or [*self._get_retriever_tags()]
        return LanceVectorStoreRetriever(vectorstore=self, tags=tags, **kwargs)


class LanceVectorStoreRetriever(VectorStoreRetriever):
    """`VectorStoreRetriever` whose search options are also fields, checked when built:
    `as_retriever(k=2)` is `as_retriever(search_kwargs={"k": 2})`; `kk=2` or
    `search_kwargs={"kk": 2}` is refused instead of failing on the first query (or, in
    LangChain's own retriever, of being ignored)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    OPTIONS: ClassVar[tuple[str, ...]] = ("k", "filter", "score_threshold", "fetch_k",
                                          "lambda_mult")

    k: int | None = Field(None, ge=1)
    filter: Filter = None
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)
    fetch_k: int | None = Field(None, ge=1)
    lambda_mult: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _fold_options(cls, values: Any) -> Any:
        """Fields into search_kwargs (before LangChain's own check of score_threshold)."""
        if not isinstance(values, dict):
            return values
        fields = {n: values[n] for n in cls.OPTIONS if values.get(n) is not None}
        search_kwargs = {**(values.get("search_kwargs") or {}), **fields}
        search_type = values.get("search_type", "similarity")
        allowed = SEARCH_OPTIONS.get(search_type)
        if allowed is not None:  # an unknown search_type is LangChain's to refuse
            unknown = sorted(set(search_kwargs) - set(allowed))
            if unknown:
                raise ValueError(f"unknown search option(s) {', '.join(unknown)} for "
                                 f"search_type={search_type!r}; it takes "
                                 f"{', '.join(allowed)}")
        _where(search_kwargs.get("filter"))  # a bad filter fails here, not on a query
        return {**values, "search_kwargs": search_kwargs}


def _no_options(method: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"LanceVectorStore.{method} got unknown option(s) "
                        f"{', '.join(sorted(kwargs))}")


def _to_columns(id_: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata as column values plus the JSON of the rest."""
    row: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in meta.items():
        kind = METADATA_COLUMNS.get(key)
        if kind and _fits(value, *kind):
            row[key] = value
        else:
            extra[key] = value
    if extra:
        try:
            row[EXTRA_COLUMN] = json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the metadata of document {id_!r} cannot be stored: {e}; "
                             "metadata values must be JSON values (str, number, bool, None, "
                             "lists and dicts of them)") from e
    return row


def _fits(value: Any, kind: type, low: int | None, high: int | None) -> bool:
    if kind is str:
        return isinstance(value, str)
    return (isinstance(value, int) and not isinstance(value, bool)
            and low is not None and high is not None and low <= value <= high)


def _document(hit: Hit) -> Document:
    meta = {k: hit.metadata[k] for k in METADATA_COLUMNS if hit.metadata.get(k) is not None}
    return Document(page_content=hit.text, metadata={**meta, **hit.extra},
                    id=hit.metadata["id"])


def _where(filter: Filter) -> str | None:  # noqa: A002
    """A LanceDB SQL filter from a LangChain metadata filter."""
    if filter is None or isinstance(filter, str):
        return filter or None
    if not isinstance(filter, dict):
        raise ValueError(f"the search option filter must be a dict of column -> value or "
                         f"a LanceDB SQL string, not {type(filter).__name__}")
    unknown = sorted(set(filter) - set(METADATA_COLUMNS) - {"id"})
    if unknown:
        raise ValueError(f"cannot filter on {', '.join(unknown)}: a filter names columns "
                         f"({', '.join(['id', *METADATA_COLUMNS])}); other metadata is "
                         "kept as JSON")
    clauses = []
    for key, value in filter.items():
        values = value if isinstance(value, (list, tuple, set)) else [value]
        literals = [_literal(key, v) for v in values]
        if key == "page" and len(values) == 1:  # chunks covering the page, as `rag --page`
            clauses.append(filters(None, int(literals[0])) or "")
        else:
            clauses.append(f"{key} IN ({', '.join(literals)})" if literals else "false")
    return " AND ".join(f"({c})" for c in clauses) or None


def _literal(key: str, value: Any) -> str:
    kind = METADATA_COLUMNS.get(key, (str, None, None))[0]
    if kind is str and isinstance(value, str):
        return sql_string(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"cannot filter {key} on {value!r}: {key} holds "
                     f"{'text' if kind is str else 'integers'}")

