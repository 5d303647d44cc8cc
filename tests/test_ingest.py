import shutil
from pathlib import Path

import pytest

from ingest.pipeline import Ingestor, SourceFile, walk
from rag_app.errors import EmbeddingMismatchError, EmptyIndexError
from rag_app.store import ChunkStore

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    shutil.copytree(DATA, folder, ignore=shutil.ignore_patterns("*.json"))
    return folder


@pytest.fixture
def store(tmp_path: Path, services) -> ChunkStore:
    return ChunkStore(str(tmp_path / "db"), services.embedder.name, services.embedder.dim)


@pytest.fixture
def ingestor(services, store: ChunkStore) -> Ingestor:
    return Ingestor(services.embedder, store, services.settings.chunking)


def test_bad_files_are_reported_by_name_and_the_rest_ingested(
        ingestor: Ingestor, store: ChunkStore, corpus: Path) -> None:
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4 not a pdf")
    (corpus / "locked.md").write_text("# Secret\n\ntext")
    (corpus / "locked.md").chmod(0)
    (corpus / ".hidden.md").write_text("# Hidden\n\nnot ingested")
    report = ingestor.ingest(walk([corpus, corpus / "missing.txt"]), "c").to_json()
    failed = {Path(f["path"]).name: f["error"] for f in report["failed"]}
    assert set(failed) == {"broken.pdf", "missing.txt"} | (
        {"locked.md"} if not _is_root() else set())
    assert report["ingested"] == 8 + (1 if _is_root() else 0)
    sources = {Path(d["source"]).name for d in store.documents("c")}
    assert ".hidden.md" not in sources and "broken.pdf" not in sources
    assert len(sources) == report["ingested"]


def _is_root() -> bool:
    import os
    return os.geteuid() == 0


def test_reingest_is_idempotent_and_changes_replace_old_chunks(
        ingestor: Ingestor, store: ChunkStore, corpus: Path) -> None:
    first = ingestor.ingest(walk([corpus]), "c").to_json()
    rows_before = sum(d["chunks"] for d in store.documents("c"))
    again = ingestor.ingest(walk([corpus]), "c").to_json()
    assert again["unchanged"] == first["ingested"] and again["ingested"] == 0
    assert sum(d["chunks"] for d in store.documents("c")) == rows_before

    target = corpus / "lancedb.md"
    target.write_text("# LanceDB\n\nA short replacement note about zebras.\n")
    changed = ingestor.ingest(walk([corpus]), "c").to_json()
    assert changed["ingested"] == 1
    docs = {Path(d["source"]).name: d for d in store.documents("c")}
    assert docs["lancedb.md"]["chunks"] == 1
    vec = ingestor.embedder.embed_query("zebras")
    hits = store.search("c", "zebras", vec, 50, "fulltext")
    assert [Path(h.source).name for h in hits] == ["lancedb.md"]
    assert all("zebras" in h.text for h in hits)


def test_delete_documents(ingestor: Ingestor, store: ChunkStore, corpus: Path) -> None:
    ingestor.ingest(walk([corpus]), "c")
    victim = str((corpus / "chunking.md").resolve())
    assert store.delete_documents("c", [victim]) > 0
    assert victim not in {d["source"] for d in store.documents("c")}


def test_uploaded_bytes_are_ingested_under_their_source_name(
        ingestor: Ingestor, store: ChunkStore) -> None:
    report = ingestor.ingest([SourceFile("upload/note.md", lambda: b"# N\n\nBananas are yellow.")],
                             "c")
    assert report.to_json()["ingested"] == 1
    assert [d["source"] for d in store.documents("c")] == ["upload/note.md"]


def test_collections_are_separate(ingestor: Ingestor, store: ChunkStore, corpus: Path) -> None:
    ingestor.ingest(walk([corpus / "chunking.md"]), "one")
    with pytest.raises(EmptyIndexError, match="'two'"):
        store.search("two", "q", [0.0] * store.dim, 3, "vector")
    assert store.collections() == ["one"]


def test_other_embedding_model_is_refused(ingestor: Ingestor, store: ChunkStore,
                                          corpus: Path) -> None:
    ingestor.ingest(walk([corpus / "chunking.md"]), "c")
    other = ChunkStore(store.uri, "another/model", store.dim)
    with pytest.raises(EmbeddingMismatchError, match="embedding.model"):
        other.documents("c")
