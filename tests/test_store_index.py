"""The vector index appears once a collection is large enough and stays fresh afterwards
(real LanceDB, the bundled embedder)."""

from pathlib import Path

import pytest

from ingest.pipeline import Ingestor, SourceFile
from rag_app.errors import EmbeddingMismatchError, StoreError
from rag_app.factory import Services
from rag_app.fusion import ZScoreFusion
from rag_app.settings import IndexSettings

TOPICS = ["rivers", "volcanoes", "bread", "engines", "violins", "glaciers", "bees", "chess",
          "comets", "tides", "coral", "saffron"]


def notes(start: int, n: int) -> list[SourceFile]:
    return [SourceFile(f"upload/note{i}.txt", lambda i=i: (
        f"Note {i} is about {TOPICS[i % len(TOPICS)]} and item number {i * 7919}.").encode())
        for i in range(start, start + n)]


@pytest.fixture
def small_threshold(services: Services, tmp_path: Path) -> Services:
    s = Services(services.settings.model_copy(update={
        "db_uri": str(tmp_path / "db"), "index": IndexSettings(vector_min_rows=300)}))
    s.__dict__["embedder"] = services.embedder
    return s


def index_types(s: Services) -> set[str]:
    return {i.index_type for i in s.store.db.open_table("c").list_indices()}


def test_vector_index_is_built_at_the_threshold_and_kept_fresh(small_threshold: Services) -> None:
    s = small_threshold
    ingestor = Ingestor(s.embedder, s.store, s.settings.chunking)
    ingestor.ingest(notes(0, 200), "c")
    assert index_types(s) == {"FTS"}  # below the threshold: exact search only

    ingestor.ingest(notes(200, 150), "c")
    assert index_types(s) == {"FTS", "IvfRq"}

    # Rows written after the index was built are found, by vector and by keyword.
    ingestor.ingest(notes(350, 5), "c")
    table = s.store.db.open_table("c")
    new_row = table.search().where("source = 'upload/note352.txt'").limit(1).to_list()[0]
    vector = new_row["vector"]
    hits = s.store.search("c", "", vector, k=5, mode="vector")
    assert hits[0].source == "upload/note352.txt" and hits[0].similarity == pytest.approx(1)
    assert s.store.search("c", "2787488", vector, k=1, mode="fulltext")[0].source == hits[0].source
    stats = s.store.db.open_table("c").index_stats("vector_idx")
    assert stats.num_indexed_rows == 355 and stats.num_unindexed_rows == 0

    # The indexed search returns what exact search returns.
    exact = (s.store.db.open_table("c").search(vector).distance_type("cosine")
             .bypass_vector_index().limit(5).to_list())
    assert [h.metadata["id"] for h in hits] == [r["id"] for r in exact]


def test_missing_full_text_index_is_a_clear_error(small_threshold: Services) -> None:
    s = small_threshold
    Ingestor(s.embedder, s.store, s.settings.chunking).ingest(notes(0, 3), "c")
    table = s.store.db.open_table("c")
    table.drop_index(next(i.name for i in table.list_indices() if i.index_type == "FTS"))
    vector = s.embedder.embed_query("bread")
    assert s.store.search("c", "bread", vector, k=2, mode="vector")  # vectors still answer
    for mode in ("fulltext", "hybrid"):
        with pytest.raises(StoreError, match="full-text index is missing"):
            s.store.search("c", "bread", vector, k=2, mode=mode, reranker=ZScoreFusion())


def test_listing_and_deleting_documents_load_no_embedding_model(demo_index: Services) -> None:
    """`rag docs` / `rag delete` open the store with the embedder's name from the settings;
    its dimension (which loads the model) is needed only to create or check a table."""
    fresh = Services(demo_index.settings)
    docs = fresh.store.documents(demo_index.settings.collection)
    assert docs and fresh.store.delete_documents(demo_index.settings.collection,
                                                 ["no/such/file.md"]) == 0
    assert "embedder" not in fresh.__dict__  # the cached_property was never built
    other = Services(demo_index.settings.model_copy(update={"embedding": demo_index.settings
                     .embedding.model_copy(update={"model": "another-model"})}))
    with pytest.raises(EmbeddingMismatchError, match="another-model"):
        other.store.documents(demo_index.settings.collection)  # refused by name alone
    assert "embedder" not in other.__dict__
