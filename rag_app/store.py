"""LanceDB: one table per collection, chunks with vectors, text and metadata.

A document (identified by its source path) is written with one `merge_insert` that also
deletes its stale chunks, so readers see either the old or the new version, never half.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import FTS, IvfHnswSq, IvfPq, IvfRq, IvfSq
from lancedb.rerankers import Reranker

from rag_app.errors import (
    EmbeddingMismatchError,
    EmptyIndexError,
    SettingsError,
    StoreBusyError,
    StoreError,
)
from rag_app.settings import MAX_PAGE, IndexSettings

if TYPE_CHECKING:
    from rag_app.originals import OriginalStore

log = logging.getLogger(__name__)
SearchMode = Literal["vector", "fulltext", "hybrid"]
_VECTOR_INDEXES = {"IVF_RQ": IvfRq, "IVF_SQ": IvfSq, "IVF_PQ": IvfPq, "IVF_HNSW_SQ": IvfHnswSq}
_RESULT_COLUMNS = [
    "id", "text", "source", "title", "page", "page_end", "heading", "chunk_index",
    "start_char", "end_char", "doc_hash", "vector",
]
# A JSON object: a chunk's metadata that has no column of its own (written by the LangChain
# vector store). Tables made before it lack the column; they are read as they are and get
# it on the first write that needs it.
EXTRA_COLUMN = "metadata_json"
# A PDF page's printed label ("25" on PDF page 29); as with EXTRA_COLUMN, older tables lack
# it until a write brings one.
LABEL_COLUMN = "page_label"
_LATER_COLUMNS = (EXTRA_COLUMN, LABEL_COLUMN)


def chunk_schema(dim: int, embedding_model: str) -> pa.Schema:
    """The table's schema; its metadata records the embedder so a mismatch is refused."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("source", pa.string()),
            pa.field("title", pa.string()),
            pa.field("page", pa.int32()),
            pa.field("page_end", pa.int32()),
            pa.field(LABEL_COLUMN, pa.string()),
            pa.field("heading", pa.string()),
            pa.field("chunk_index", pa.int32()),
            pa.field("start_char", pa.int64()),
            pa.field("end_char", pa.int64()),
            pa.field("doc_hash", pa.string()),
            pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
            pa.field("embedding_model", pa.string()),
            pa.field(EXTRA_COLUMN, pa.string()),
        ],
        metadata={"embedding_model": embedding_model, "dim": str(dim)},
    )


@dataclass
class Hit:
    """One retrieved chunk. `score` is the mode's ranking score; `similarity` is cosine."""

    text: str
    source: str
    score: float
    similarity: float
    page: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: list[float] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)  # the metadata without a column


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


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


class ChunkStore:
    """A LanceDB connection plus the embedding model identity its tables must match."""

    def __init__(self, uri: str, embedding_model: str, dim: int | Callable[[], int],
                 index: IndexSettings | None = None,
                 storage_options: dict[str, str] | None = None,
                 originals: OriginalStore | None = None) -> None:
        """`dim`: the embedder's dimension, or a callable giving it on first need (creating
        a table, checking one built with a model of the same name), so that listing or
        deleting documents never loads the embedding model. `originals`: where uploads'
        original bytes are kept; a document's are deleted with it."""
        self.uri = uri
        self.originals = originals
        self.embedding_model = embedding_model
        self._dim = dim
        self.index = index or IndexSettings()
        try:
            self.db = lancedb.connect(uri, storage_options=storage_options or None)
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot open database RAG_DB_URI={uri!r}: {e}") from e

    @property
    def dim(self) -> int:
        if callable(self._dim):
            self._dim = self._dim()
        return self._dim

    # -- tables ---------------------------------------------------------------------------
    def collections(self) -> list[str]:
        with self._reading():
            return sorted(self.db.list_tables().tables)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except (OSError, RuntimeError) as e:
            if "LanceError(IO)" not in str(e) and not isinstance(e, OSError):
                raise
            raise StoreError(f"cannot read the database at RAG_DB_URI={self.uri!r} "
                             f"(check it and db_storage_options): {str(e).splitlines()[0]}") from e

    def _open(self, collection: str) -> lancedb.table.Table | None:
        try:
            with self._reading():
                table = self.db.open_table(collection)
        except ValueError:
            return None
        self._check_embedder(collection, table.schema)
        return table

    def _check_embedder(self, collection: str, schema: pa.Schema) -> None:
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        model, dim = meta.get("embedding_model"), meta.get("dim")
        # a model's name fixes its dimension: the dimension is checked (and the model loaded
        # for it) only where it is known already
        known = not callable(self._dim)
        if model != self.embedding_model or (known and dim != str(self.dim)):
            raise EmbeddingMismatchError(
                f"collection {collection!r} was built with embedding model {model!r} "
                f"(dim {dim}), but embedding.model is {self.embedding_model!r}"
                f"{f' (dim {self._dim})' if known else ''}; "
                "use the same embedding.model or ingest into another collection"
            )

    def _require(self, collection: str) -> lancedb.table.Table:
        table = self._open(collection)
        if table is None or table.count_rows() == 0:
            raise EmptyIndexError(
                f"collection {collection!r} at RAG_DB_URI={self.uri!r} has no documents; "
                "run `rag ingest PATH` first"
            )
        return table

    def _create(self, collection: str) -> lancedb.table.Table:
        table = self._open(collection)
        if table is None:
            schema = chunk_schema(self.dim, self.embedding_model)
            table = self.db.create_table(collection, schema=schema, exist_ok=True)
        return table

    # -- writes ---------------------------------------------------------------------------
    @contextmanager
    def writing(self, collection: str) -> Iterator[None]:
        """Turn LanceDB's failures on a write into messages naming what to change.

        Lance commits atomically: a write that fails here leaves the collection as it was.
        """
        try:
            yield
        except (OSError, RuntimeError) as e:
            msg = str(e)
            where = f"RAG_DB_URI={self.uri!r}"
            if "os error 28" in msg or "No space left" in msg:
                raise StoreError(f"no space left on the device of {where}; free some space or "
                                 f"point RAG_DB_URI elsewhere ({collection!r} is unchanged)") from e
            if any(s in msg for s in ("os error 30", "Read-only file system", "os error 13",
                                      "Permission denied")):
                raise StoreError(f"the database location {where} is read-only; point "
                                 f"RAG_DB_URI to a writable location ({collection!r} is "
                                 "unchanged)") from e
            if "onflict" in msg:
                raise StoreBusyError(f"collection {collection!r} at {where} is busy: another "
                                     "process is writing it; try again when it has finished") from e
            if "LanceError(IO)" in msg or isinstance(e, OSError):
                raise StoreError(f"cannot write to {where}: {msg.splitlines()[0]}") from e
            raise

    def document_hashes(self, collection: str) -> dict[str, str]:
        """source -> content hash of every stored document."""
        table = self._open(collection)
        if table is None:
            return {}
        rows = table.to_lance().to_table(columns=["source", "doc_hash"]).to_pylist()
        return {r["source"]: r["doc_hash"] for r in rows if r["source"] is not None}

    def upsert_documents(self, collection: str, documents: dict[str, Sequence[dict]]) -> None:
        """Replace all chunks of each source by its rows, in one atomic commit.

        A reader (or a crash) sees every document of the batch either before or after.
        """
        if not documents:
            return
        with self.writing(collection):
            self._merge(self._create(collection), documents)

    @staticmethod
    def _merge(table: Any, documents: dict[str, Sequence[dict]]) -> None:
        rows = [row for doc_rows in documents.values() for row in doc_rows]
        _add_missing_columns(table, rows)
        data = pa.Table.from_pylist(rows, schema=table.schema)
        sources = ", ".join(sql_string(s) for s in documents)
        (
            table.merge_insert("id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(f"source IN ({sources})")
            .execute(data)
        )

    def upsert_chunks(self, collection: str, rows: Sequence[dict]) -> None:
        """Insert chunks or replace those with the same id, in one atomic commit; unlike
        `upsert_documents`, the other chunks of their documents stay."""
        if not rows:
            return
        with self.writing(collection):
            table = self._create(collection)
            _add_missing_columns(table, rows)
            data = pa.Table.from_pylist(list(rows), schema=table.schema)
            table.merge_insert("id").when_matched_update_all() \
                .when_not_matched_insert_all().execute(data)

    def delete_chunks(self, collection: str, ids: Iterable[str]) -> int:
        table = self._open(collection)
        ids = list(ids)
        if table is None or not ids:
            return 0
        with self.writing(collection):
            return table.delete(_id_filter(ids)).num_deleted_rows

    def chunks(self, collection: str, ids: Iterable[str]) -> list[Hit]:
        """The stored chunks of these ids (missing ones left out), scores 0."""
        table = self._open(collection)
        ids = list(ids)
        if table is None or not ids:
            return []
        with self._reading():
            rows = table.search().where(_id_filter(ids)).select(_columns(table)) \
                .limit(len(ids)).to_arrow().to_pylist()
        return [self._hit(r, None) for r in rows]

    def delete_documents(self, collection: str, sources: Iterable[str]) -> int:
        table = self._open(collection)
        sources = list(sources)
        if table is None or not sources:
            return 0
        where = "source IN (" + ", ".join(sql_string(s) for s in sources) + ")"
        with self.writing(collection):
            deleted = table.delete(where).num_deleted_rows
        if self.originals is not None:  # after the chunks: a failure here leaves unused bytes,
            # never a card whose original is gone
            self.originals.delete(collection, sources)
        return deleted

    def refresh_indexes(self, collection: str) -> None:
        """Bring the indexes up to date; cheap when they already are, so callers may call it
        after every ingest (also one that found nothing new: a crash may have come between
        the last write and its index update).

        The full-text index is built once; the vector index once the collection reaches
        `index.vector_min_rows` chunks. Afterwards `optimize` folds new rows into both (and
        compacts small files), so searches stay indexed as the collection grows.
        """
        table = self._open(collection)
        if table is None:
            return
        with self.writing(collection):
            indices = table.list_indices()
            columns = {col for i in indices for col in i.columns}
            if "text" not in columns:
                table.create_index("text", config=FTS(), replace=True)
            if "vector" not in columns and table.count_rows() >= self.index.vector_min_rows:
                log.info("building the %s vector index of %r", self.index.vector_type, collection)
                kind = _VECTOR_INDEXES[self.index.vector_type]
                extra = {"num_bits": self.index.rq_bits} if kind is IvfRq else {}
                config = kind(distance_type="cosine", **extra)
                table.create_index("vector", config=config, replace=True)
            if any(i.num_unindexed_rows for i in indices):
                table.optimize()

    # -- reads ----------------------------------------------------------------------------
    def documents(self, collection: str) -> list[dict[str, Any]]:
        """One row per document: source, title, chunks, pages, ingested_at. Chunks without
        a source (added through the vector store without one) belong to no document."""
        table = self._open(collection)
        if table is None:
            return []
        cols = ["source", "title", "page", "doc_hash", "ingested_at"]
        docs: dict[str, dict[str, Any]] = {}
        for r in table.to_lance().to_table(columns=cols).to_pylist():
            if r["source"] is None:
                continue
            d = docs.setdefault(r["source"], {
                "source": r["source"], "title": r["title"], "chunks": 0, "pages": set(),
                "doc_hash": r["doc_hash"], "ingested_at": r["ingested_at"],
            })
            d["chunks"] += 1
            if r["page"] is not None:
                d["pages"].add(r["page"])
        return [{**d, "pages": len(d["pages"]) or None} for d in sorted(
            docs.values(), key=lambda d: d["source"])]

    def search(
        self, collection: str, query: str, vector: Sequence[float], k: int,
        mode: SearchMode = "hybrid", where: str | None = None, reranker: Reranker | None = None,
        candidates: int | None = None,
    ) -> list[Hit]:
        """The k best chunks. Hybrid fuses the vector and BM25 rankings with `reranker`
        (required: `rag_app.fusion.fusion_reranker`, or a cross-encoder); a reranker given
        to the other modes rescores their candidates. `candidates` per side: default
        max(4k, 20)."""
        table = self._require(collection)
        try:
            rows = self._ranked(table, query, vector, k, mode, where, reranker,
                                max(candidates or max(4 * k, 20), k))
        except ValueError as e:  # LanceDB's way of saying the FTS index does not exist
            if "INVERTED index" not in str(e):
                raise
            raise StoreError("the full-text index is missing; run `rag ingest` again or use "
                             "--mode vector") from e
        return [self._hit(r, vector) for r in rows.slice(0, k).to_pylist()]

    def _ranked(self, table: Any, query: str, vector: Sequence[float], k: int, mode: SearchMode,
                where: str | None, reranker: Reranker | None, n: int) -> pa.Table:
        """`n`: candidates fetched from each side before fusing or reranking."""
        if mode == "vector" and reranker is None:
            return self._vector_query(table, vector, where).limit(k).to_arrow()
        if mode == "fulltext" and reranker is None:
            return self._text_query(table, query, where).limit(k).to_arrow()
        if mode == "vector":
            return reranker.rerank_vector(
                query, self._vector_query(table, vector, where).limit(n).to_arrow())
        if mode == "fulltext":
            return reranker.rerank_fts(
                query, self._text_query(table, query, where).limit(n).to_arrow())
        if reranker is None:
            raise TypeError("a hybrid search needs a reranker to fuse its two rankings "
                             "(rag_app.fusion.fusion_reranker)")
        return reranker.rerank_hybrid(
            query,
            self._vector_query(table, vector, where).limit(n).with_row_id(True).to_arrow(),
            self._text_query(table, query, where).limit(n).with_row_id(True).to_arrow())

    def _vector_query(self, table: Any, vector: Sequence[float], where: str | None) -> Any:
        q = (table.search(list(vector), query_type="vector").distance_type("cosine")
             .nprobes(self.index.nprobes).refine_factor(self.index.refine_factor)
             .select([*_columns(table), "_distance"]))
        return q.where(where, prefilter=True) if where else q

    @staticmethod
    def _text_query(table: Any, query: str, where: str | None) -> Any:
        q = table.search(query, query_type="fts").select([*_columns(table), "_score"])
        return q.where(where, prefilter=True) if where else q

    @staticmethod
    def _hit(row: dict[str, Any], query_vector: Sequence[float] | None) -> Hit:
        """A result row as a Hit; a row read without a query (`chunks`) scores 0."""
        vec = row.pop("vector")
        similarity = float(np.dot(vec, query_vector)) if query_vector is not None else 0.0
        if "_relevance_score" in row:
            score = row["_relevance_score"]
        elif "_score" in row:
            score = row["_score"]
        else:
            score = 1.0 - row.get("_distance", 1.0)  # cosine distance -> similarity
        extra = json.loads(row.pop(EXTRA_COLUMN, None) or "{}")
        meta = {k: v for k, v in row.items() if not k.startswith("_") and k != "text"}
        for key, value in extra.items():  # a column's value wins over an extra of its name
            meta.setdefault(key, value)
        return Hit(text=row["text"], source=row["source"], score=float(score),
                   similarity=similarity, page=row.get("page"), metadata=meta, vector=vec,
                   extra=extra)


def _columns(table: Any) -> list[str]:
    """The result columns `table` has (tables made before EXTRA_COLUMN or LABEL_COLUMN
    lack them)."""
    return [*_RESULT_COLUMNS, *(c for c in _LATER_COLUMNS if c in table.schema.names)]


def _add_missing_columns(table: Any, rows: Sequence[dict]) -> None:
    """Give an older table the later columns these rows fill (else their values would be
    dropped)."""
    for name in _LATER_COLUMNS:
        if name not in table.schema.names and any(r.get(name) is not None for r in rows):
            table.add_columns(pa.field(name, pa.string()))


def _id_filter(ids: Iterable[str]) -> str:
    return "id IN (" + ", ".join(sql_string(i) for i in ids) + ")"
