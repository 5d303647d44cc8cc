"""Retrieval on real LanceDB with the bundled embedder: fusion, filters, relevance floor."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ingest.pipeline import Ingestor, SourceFile
from rag_app.factory import Services
from rag_app.fusion import ZScoreFusion

DOCS = {
    "upload/parts.md": "# Inventory\n\nItem QX-7734 ships from warehouse nine on Tuesdays.",
    "upload/engine.md": "# Vehicles\n\nAn automobile engine component that every vehicle "
                        "needs to run: the spark plug ignites the fuel.",
    "upload/baking.md": "# Bread\n\nSourdough rises slowly because wild yeast ferments "
                        "the dough overnight.",
}


@pytest.fixture
def lean(services, tmp_path: Path) -> Services:
    """Services on a fresh database that share the session's embedder (LLM not loaded)."""
    s = Services(services.settings.model_copy(update={"db_uri": str(tmp_path / "db")}))
    s.__dict__["embedder"] = services.embedder
    Ingestor(s.embedder, s.store, s.settings.chunking).ingest(
        [SourceFile(name, lambda t=text: t.encode()) for name, text in DOCS.items()], "c")
    return s


def names(docs) -> list[str]:
    return [d.metadata["source"] for d in docs]


@pytest.mark.parametrize("fusion", ["zscore", "rrf"])
def test_hybrid_fuses_a_keyword_only_hit_and_a_meaning_only_hit(lean: Services,
                                                                fusion: str) -> None:
    query = "what makes a car motor start QX-7734"
    r = lean.retriever("c")
    fulltext = names(r.invoke(query, mode="fulltext", k=3, min_similarity=-1))
    assert fulltext[0] == "upload/parts.md" and "upload/engine.md" not in fulltext
    vector = names(r.invoke(query, mode="vector", k=1, min_similarity=-1))
    assert vector == ["upload/engine.md"]
    hybrid = names(r.invoke(query, mode="hybrid", k=2, min_similarity=-1, fusion=fusion))
    assert set(hybrid) == {"upload/parts.md", "upload/engine.md"}


def test_zscore_fusion_by_hand() -> None:
    vec = pa.table({"_rowid": [1, 2, 3], "text": ["a", "b", "c"],
                    "_distance": pa.array([0.1, 0.3, 0.5], pa.float32())})  # sims .9 .7 .5
    fts = pa.table({"_rowid": [3, 4], "text": ["c", "d"],
                    "_score": pa.array([9.0, 1.0], pa.float32())})
    out = ZScoreFusion(0.5).rerank_hybrid("q", vec, fts).to_pylist()
    z = 0.2 / np.std([0.9, 0.7, 0.5])  # vector z-scores: +z, 0, -z; BM25: +1, -1
    expected = {1: 0.5 * z - 0.5, 2: -0.5, 3: -0.5 * z + 0.5, 4: -0.5 * z - 0.5}
    assert [r["_rowid"] for r in out] == sorted(expected, key=lambda i: -expected[i])
    assert {r["_rowid"]: r["_relevance_score"] for r in out} == pytest.approx(expected,
                                                                             abs=1e-5)
    assert "_distance" not in out[0] and "_score" not in out[0]
    # all weight on the vector side: the vector order stands
    only_vec = ZScoreFusion(1.0).rerank_hybrid("q", vec, fts).to_pylist()
    assert [r["_rowid"] for r in only_vec][:2] == [1, 2]


def test_source_filter_excludes_other_documents(lean: Services) -> None:
    docs = lean.retriever("c").invoke("engine bread warehouse", source="upload/baking.md",
                                      min_similarity=-1)
    assert names(docs) == ["upload/baking.md"]


def test_relevance_floor_answers_not_found_without_loading_the_model(lean: Services) -> None:
    result = lean.chain("c").answer("Who won the 1954 football world cup?")
    assert not result.found and result.sources == []
    assert "lm" not in lean.__dict__ and "chat_model" not in lean.__dict__
    assert result.to_json()["model"] == lean.settings.llm.model


def test_page_filter_keeps_chunks_covering_that_page(lean: Services, pdf_bytes) -> None:
    long = " ".join(f"word{i}" for i in range(260))  # longer than a chunk: stands alone
    pages = ["Short intro about the tide tables.", "The tide turns at noon on page two.",
             "Page three explains lighthouse lamps. " + long]
    Ingestor(lean.embedder, lean.store, lean.settings.chunking).ingest(
        [SourceFile("upload/manual.pdf", lambda: pdf_bytes(pages))], "c")
    r = lean.retriever("c")
    covering = {(d.metadata["page"], d.metadata["page_end"])
                for d in r.invoke("tide lighthouse", page=2, k=10, min_similarity=-1)}
    assert covering == {(1, 2)}  # pages 1-2 were short enough to share one chunk
    third = r.invoke("tide lighthouse", page=3, k=10, min_similarity=-1)
    assert third and {d.metadata["page"] for d in third} == {3}
    assert r.invoke("tide", page=4, k=10, min_similarity=-1) == []


def test_mmr_prefers_a_different_passage_over_a_near_duplicate(lean: Services) -> None:
    twins = "Sourdough rises slowly because wild yeast ferments the dough overnight."
    other = "Sourdough bread keeps its crust crisp when it is stored in a paper bag."
    Ingestor(lean.embedder, lean.store, lean.settings.chunking).ingest(
        [SourceFile("upload/twin1.md", lambda: f"# Bread\n\n{twins}".encode()),
         SourceFile("upload/twin2.md", lambda: f"# Bread\n\n{twins} Really.".encode()),
         SourceFile("upload/storage.md", lambda: f"# Bread\n\n{other}".encode())], "c")
    r = lean.retriever("c")
    query = "why does sourdough rise slowly"
    plain = names(r.invoke(query, mode="vector", k=2, min_similarity=-1))
    assert set(plain) <= {"upload/baking.md", "upload/twin1.md", "upload/twin2.md"}
    diverse = names(r.invoke(query, mode="vector", k=2, mmr=True, mmr_lambda=0.3,
                             min_similarity=-1))
    assert len({"upload/baking.md", "upload/twin1.md", "upload/twin2.md"} & set(diverse)) == 1


def test_rerank_orders_candidates_by_the_cross_encoder(lean: Services) -> None:
    """No cross-encoder ships offline: the bundled MiniLM checkpoint is loaded as one (its
    scoring head untrained), which exercises the real path: LanceDB's CrossEncoderReranker
    scores every candidate and the passages come back in its order."""
    from rag_app.errors import SettingsError
    from rag_app.settings import BUNDLED_EMBEDDER

    with pytest.raises(SettingsError, match="retrieval.rerank_model"):
        lean.retriever("c").invoke("bread", rerank=True)
    s = Services(lean.settings.model_copy(update={"retrieval": lean.settings.retrieval.model_copy(
        update={"rerank_model": BUNDLED_EMBEDDER})}))
    s.__dict__["embedder"], s.__dict__["store"] = lean.embedder, lean.store
    query = "what makes a car motor start"
    docs = s.retriever("c").invoke(query, rerank=True, k=3, min_similarity=-1)
    model = s.reranker.model  # the CrossEncoder LanceDB loaded
    expected = model.predict([(query, d.page_content) for d in docs]).tolist()
    assert [d.metadata["score"] for d in docs] == pytest.approx(expected, rel=1e-4)
    assert expected == sorted(expected, reverse=True)
    assert len(docs) == 3  # every candidate was scored, the best k kept


def test_retriever_takes_search_options_as_fields_and_refuses_unknown_ones(
        lean: Services) -> None:
    from rag_app.errors import SettingsError
    from rag_app.retriever import LanceRetriever

    base = {"store": lean.store, "embedder": lean.embedder, "collection": "c",
            "settings": lean.settings.retrieval}
    two = LanceRetriever(**base, k=2, min_similarity=-1)
    assert len(two.invoke("engine bread warehouse")) == 2
    assert len(two.invoke("engine bread warehouse", k=1)) == 1  # a call overrides the field
    assert names(LanceRetriever(**base, source="upload/parts.md", min_similarity=-1)
                 .invoke("anything")) == ["upload/parts.md"]
    with pytest.raises(ValueError, match="kk"):
        LanceRetriever(**base, kk=2)  # a typo is refused, not ignored
    with pytest.raises(SettingsError, match="retrieval.k"):
        LanceRetriever(**base, k=0)
