"""`LanceVectorStore`: LangChain's standard vector-store suite (sync and async) on a real
LanceDB in a temp dir with the suite's fake embeddings, and the project's own checks with
the bundled embedder through `Services`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import VectorStoreRetriever
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from ingest.pipeline import Ingestor, SourceFile
from rag_app.errors import EmbeddingMismatchError
from rag_app.factory import Services
from rag_app.retriever import LanceRetriever
from rag_app.store import EXTRA_COLUMN, ChunkStore, chunk_schema
from rag_app.vectorstore import LanceVectorStore


class TestLanceVectorStoreStandard(VectorStoreIntegrationTests):
    """The whole suite of langchain-tests (its sync and its async tests), each on an empty
    collection of a fresh database."""

    @pytest.fixture
    def vectorstore(self, tmp_path: Path) -> LanceVectorStore:
        embeddings = self.get_embeddings()
        dim = len(embeddings.embed_query("dimension"))
        store = ChunkStore(str(tmp_path / "db"), "deterministic-fake", dim)
        return LanceVectorStore(store, "standard", embeddings)


@pytest.fixture
def lean(services: Services, tmp_path: Path) -> Services:
    """Services on a fresh database sharing the session's embedder (LLM not loaded)."""
    s = Services(services.settings.model_copy(update={"db_uri": str(tmp_path / "db")}))
    s.__dict__["embedder"] = services.embedder
    return s


DOCS = [
    Document(id="engine", page_content="The spark plug ignites the fuel so that a car "
             "engine starts and runs.", metadata={"source": "notes/cars.md", "page": 2}),
    Document(id="bread", page_content="Sourdough rises slowly because wild yeast ferments "
             "the dough overnight.", metadata={"source": "notes/baking.md", "page": 5}),
    Document(id="warehouse", page_content="Item QX-7734 ships from warehouse nine on "
             "Tuesdays.", metadata={"source": "notes/parts.md", "tag": "inventory"}),
]


def test_services_builds_it_over_the_settings_collection_with_the_bundled_embedder(
        lean: Services) -> None:
    vs = lean.vectorstore()
    assert vs.collection == lean.settings.collection and vs.embeddings is lean.embedder
    assert vs.add_documents(DOCS) == ["engine", "bread", "warehouse"]
    found = vs.similarity_search_with_score("why does bread dough rise?", k=3)
    assert [d.id for d, _ in found][0] == "bread"
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    schema = lean.store.db.open_table(lean.settings.collection).schema
    assert schema.metadata[b"embedding_model"].decode() == lean.embedder.name
    assert lean.vectorstore("other").similarity_search("bread") == []  # no table yet


def test_metadata_round_trips_and_fills_the_schema_columns(lean: Services) -> None:
    vs = lean.vectorstore("meta")
    meta = {"source": "guide.pdf", "page": 3, "page_end": 4, "title": "Guide",
            "heading": "Intro > Scope", "chunk_index": 7,
            # no column, or not of the column's type: kept as JSON
            "id": 1, "tags": ["a", "b"], "nested": {"x": 1.5, "ok": True}, "note": None,
            "chunk_index_label": "seventh", "start_char": "zero", "title_lang": "en"}
    vs.add_documents([Document(id="g", page_content="Scope of the guide.", metadata=meta)])
    assert vs.get_by_ids(["g"]) == [Document(id="g", page_content="Scope of the guide.",
                                             metadata=meta)]
    row = lean.store.db.open_table("meta").to_arrow().to_pylist()[0]
    assert (row["source"], row["page"], row["page_end"], row["title"], row["heading"],
            row["chunk_index"], row["start_char"]) == (
        "guide.pdf", 3, 4, "Guide", "Intro > Scope", 7, None)
    assert json.loads(row[EXTRA_COLUMN]) == {
        "id": 1, "tags": ["a", "b"], "nested": {"x": 1.5, "ok": True}, "note": None,
        "chunk_index_label": "seventh", "start_char": "zero", "title_lang": "en"}
    assert row["embedding_model"] == lean.embedder.name and row["ingested_at"] is not None
    # the columns are what the filters use
    assert vs.similarity_search("scope", filter={"source": "guide.pdf", "page": 4})[0].id == "g"
    assert vs.similarity_search("scope", filter={"source": ["x.pdf", "y.pdf"]}) == []
    with pytest.raises(ValueError, match="cannot filter on tags"):
        vs.similarity_search("scope", filter={"tags": "a"})
    with pytest.raises(ValueError, match="JSON values"):
        vs.add_texts(["x"], [{"when": object()}])


def test_as_retriever_takes_k_and_the_search_options_and_refuses_unknown_ones(
        lean: Services) -> None:
    vs = lean.vectorstore("r")
    vs.add_documents(DOCS)
    two = vs.as_retriever(search_kwargs={"k": 2})
    assert isinstance(two, VectorStoreRetriever)  # LangChain's own retriever
    docs = two.invoke("how does a car engine start?")
    assert len(docs) == 2 and docs[0].id == "engine"
    assert [d.id for d in vs.as_retriever(k=1).invoke("car engine")] == ["engine"]
    assert [d.id for d in vs.as_retriever(k=3, filter={"source": "notes/parts.md"})
            .invoke("car engine")] == ["warehouse"]
    mmr = vs.as_retriever(search_type="mmr", k=2, fetch_k=3, lambda_mult=0.5)
    assert len(mmr.invoke("car engine")) == 2
    sure = vs.as_retriever(search_type="similarity_score_threshold", score_threshold=0.3)
    assert [d.id for d in sure.invoke("why does sourdough rise?")] == ["bread"]
    for bad in ({"kk": 2}, {"search_kwargs": {"kk": 2}}, {"search_kwargs": {"fetch_k": 9}},
                {"k": 0}, {"filter": {"color": "red"}}):
        with pytest.raises(ValueError, match="kk|fetch_k|k|color"):
            vs.as_retriever(**bad)
    with pytest.raises(TypeError, match="kk"):
        vs.similarity_search("car", kk=2)
    with pytest.raises(ValueError, match="needs the ids"):
        vs.delete()


def test_a_table_built_with_another_embedding_model_is_refused(lean: Services) -> None:
    other = ChunkStore(lean.settings.db_uri, "some-other-model", 6)
    LanceVectorStore(other, "theirs", DeterministicFakeEmbedding(size=6)).add_texts(["x"])
    vs = lean.vectorstore("theirs")
    with pytest.raises(EmbeddingMismatchError, match="embedding.model"):
        vs.add_texts(["mine"])
    with pytest.raises(EmbeddingMismatchError, match="'theirs'"):
        vs.similarity_search("x")
    # an Embeddings of another dimension than the store's is refused too
    wrong = LanceVectorStore(lean.store, "mine", DeterministicFakeEmbedding(size=6))
    with pytest.raises(EmbeddingMismatchError, match="dim 6"):
        wrong.add_texts(["x"])
    assert "mine" not in lean.store.collections()


@pytest.mark.parametrize("mode", ["vector", "fulltext", "hybrid"])
def test_the_project_retriever_reads_what_the_vector_store_wrote(lean: Services,
                                                                 mode: str) -> None:
    lean.vectorstore("shared").add_documents(DOCS)
    docs = lean.retriever("shared").invoke("Item QX-7734 warehouse", mode=mode, k=1,
                                            min_similarity=-1)
    assert [(d.id, d.metadata["source"], d.metadata["tag"]) for d in docs] == [
        ("warehouse", "notes/parts.md", "inventory")]
    paged = LanceRetriever(store=lean.store, embedder=lean.embedder, collection="shared",
                           settings=lean.settings.retrieval, page=5, min_similarity=-1)
    assert [d.id for d in paged.invoke("yeast", mode=mode)] == ["bread"]


def test_ingested_chunks_and_an_older_table_without_the_metadata_column(
        lean: Services) -> None:
    """A table made before metadata_json is read as it is and gains the column on the first
    write that needs it; ingested chunks come back with their columns as metadata."""
    store = lean.store
    old = chunk_schema(store.dim, store.embedding_model)
    old = pa.schema([f for f in old if f.name != EXTRA_COLUMN], metadata=old.metadata)
    store.db.create_table("old", schema=old)
    Ingestor(lean.embedder, store, lean.settings.chunking).ingest(
        [SourceFile("upload/cars.md", lambda: b"# Cars\n\nThe spark plug ignites the fuel.")],
        "old")
    vs = lean.vectorstore("old")
    (ingested,) = vs.similarity_search("spark plug", k=1)
    assert ingested.metadata["source"] == "upload/cars.md"
    assert ingested.metadata["heading"] == "Cars" and "score" not in ingested.metadata
    vs.add_documents([Document(id="n", page_content="Sourdough needs wild yeast.",
                               metadata={"source": "notes.md", "tag": "baking"}),
                      Document(id="free", page_content="A chunk of no document.")])
    assert EXTRA_COLUMN in store.db.open_table("old").schema.names
    # `rag list` and the documents page: a chunk without a source belongs to no document
    assert [d["source"] for d in store.documents("old")] == ["notes.md", "upload/cars.md"]
    assert set(store.document_hashes("old")) == {"notes.md", "upload/cars.md"}
    assert vs.get_by_ids(["n"])[0].metadata == {"source": "notes.md", "tag": "baking"}
    assert vs.get_by_ids([ingested.id]) == [ingested]
    vs.delete([ingested.id])  # one chunk, not its whole document
    assert vs.get_by_ids([ingested.id]) == [] and len(vs.get_by_ids(["n"])) == 1


def test_from_texts_opens_a_database_for_any_embeddings(tmp_path: Path) -> None:
    vs = LanceVectorStore.from_texts(
        ["alpha", "beta"], DeterministicFakeEmbedding(size=10), [{"n": 1}, {"n": 2}],
        ids=["a", "b"], db_uri=str(tmp_path / "db"), embedding_model="fake-10",
        collection="c")
    assert [d.metadata for d in vs.similarity_search("beta", k=2)] == [{"n": 2}, {"n": 1}]
    with pytest.raises(ValueError, match="embedding_model"):
        LanceVectorStore.from_texts(["x"], DeterministicFakeEmbedding(size=10),
                                    db_uri=str(tmp_path / "db"))
