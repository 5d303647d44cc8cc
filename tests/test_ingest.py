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


def _limits(**kw):
    from rag_app.settings import IngestionSettings
    return IngestionSettings(**kw)


def test_zip_entries_are_ingested_as_labels_never_as_paths(
        services, store: ChunkStore, tmp_path: Path) -> None:
    import zipfile
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes/a.md", "# A\n\nApples are red.")
        zf.writestr("../../escape.md", "# E\n\nEscaping entries stay labels.")
        zf.writestr("/abs/b.txt", "Absolute names are labels too.")
        zf.writestr("image.png", b"\x89PNG")
    before = set(tmp_path.parent.rglob("*"))
    ingestor = Ingestor(services.embedder, store, services.settings.chunking)
    report = ingestor.ingest(walk([archive]), "c").to_json()
    assert report["ingested"] == 3 and not report["failed"]
    names = sorted(d["source"].split("bundle.zip/")[1] for d in store.documents("c"))
    assert names == ["abs/b.txt", "escape.md", "notes/a.md"]
    new = set(tmp_path.parent.rglob("*")) - before
    assert new and all((tmp_path / "db") in p.parents for p in new)  # only the database grew


def test_zip_bomb_is_bounded_and_big_files_refused(services, store: ChunkStore,
                                                    tmp_path: Path) -> None:
    import zipfile
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("small.txt", "fine " * 10)
        zf.writestr("huge.txt", "a" * 5_000_000)  # compresses to a few KB
    big = tmp_path / "big.txt"
    big.write_text("word " * 300_000)  # 1.5 MB
    ingestor = Ingestor(services.embedder, store, services.settings.chunking,
                        _limits(max_archive_mb=1, max_file_mb=1))
    report = ingestor.ingest(walk([bomb, big]), "c").to_json()
    failed = {f["path"].rsplit("/", 1)[-1]: f["error"] for f in report["failed"]}
    assert "max_archive_mb" in failed["huge.txt"]
    assert "max_file_mb" in failed["big.txt"]
    assert [d["source"].rsplit("/", 1)[-1] for d in store.documents("c")] == ["small.txt"]


def test_symlink_loop_does_not_hang(ingestor: Ingestor, store: ChunkStore,
                                    tmp_path: Path) -> None:
    folder = tmp_path / "loop"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nLoops are skipped.")
    (folder / "self").symlink_to(folder, target_is_directory=True)
    report = ingestor.ingest(walk([folder]), "c").to_json()
    assert report["ingested"] == 1 and not report["failed"]


def test_legacy_encodings_csv_and_glob(ingestor: Ingestor, store: ChunkStore,
                                       tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "latin.txt").write_bytes("Le café coûte deux euros à Noël.".encode("cp1252"))
    (folder / "table.csv").write_text("city,population\nOslo,700000\nBergen,285000\n")
    (folder / "skip.md").write_text("# Skip\n\nNot matched by the glob.")
    report = ingestor.ingest(walk([folder], "*.[tc]*"), "c").to_json()
    assert report["ingested"] == 2 and not report["failed"]
    vec = ingestor.embedder.embed_query("café")
    texts = [h.text for h in store.search("c", "café Bergen", vec, 5, "vector")]
    assert any("café coûte" in t for t in texts)
    assert any("city: Bergen; population: 285000" in t for t in texts)


def test_pdf_without_text_layer_says_so() -> None:
    import io

    from pypdf import PdfWriter

    from ingest.loaders import load_document
    from rag_app.errors import LoaderError
    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    buf = io.BytesIO()
    writer.write(buf)
    with pytest.raises(LoaderError, match="no extractable text"):
        load_document(buf.getvalue(), "scan.pdf")


def test_sync_removes_documents_whose_files_are_gone_and_bad_batch_keeps_index(
        ingestor: Ingestor, store: ChunkStore, corpus: Path) -> None:
    ingestor.ingest(walk([corpus]), "c")
    before = store.documents("c")
    bad = corpus.parent / "bad"
    bad.mkdir()
    (bad / "x.pdf").write_bytes(b"%PDF broken")
    (bad / "y.txt").write_bytes(b"\x00\x01binary")
    assert len(ingestor.ingest(walk([bad]), "c").failed) == 2
    assert store.documents("c") == before

    (corpus / "lancedb.md").unlink()
    report = ingestor.ingest(walk([corpus]), "c", sync_prefixes=[str(corpus.resolve())])
    assert [Path(s).name for s in report.removed] == ["lancedb.md"]
    assert len(store.documents("c")) == len(before) - 1


def test_walk_yields_regular_files_only_and_reports_the_rest(tmp_path: Path) -> None:
    import os

    from ingest.sources import FileResult

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.md").write_text("# Fine\n\ntext")
    os.mkfifo(folder / "pipe.txt")  # reading it would wait forever for a writer
    (folder / "zero.txt").symlink_to("/dev/zero")  # stat says 0 bytes; reads never end
    outside = tmp_path / "secret.txt"
    outside.write_text("not in the folder")
    (folder / "leak.txt").symlink_to(outside)
    deep = folder
    for _ in range(70):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "far.md").write_text("# Far\n\ntoo deep")
    items = list(walk([folder], max_depth=64))
    ok = [i.source for i in items if not isinstance(i, FileResult)]
    failed = {Path(i.path).name: i.error for i in items if isinstance(i, FileResult)}
    assert [Path(s).name for s in ok] == ["ok.md"]
    assert "regular file" in failed["pipe.txt"] and "outside the folder" in failed["zero.txt"]
    # given by name, the link is followed, but to a device: refused all the same
    (only,) = walk([folder / "zero.txt"])
    assert isinstance(only, FileResult) and "regular file" in only.error
    assert "outside the folder" in failed["leak.txt"]
    assert "ingestion.max_depth" in failed["d"]
    assert [Path(i.source).name for i in walk([folder], "leak*", outside_links=True)
            if isinstance(i, SourceFile)] == ["secret.txt"]  # named by what it reads
    # a folder deeper than Python's recursion limit is walked, not a RecursionError
    assert len(list(walk([folder], max_depth=10_000))) == 5


def test_sync_removes_only_what_is_proven_gone(ingestor: Ingestor, store: ChunkStore,
                                               tmp_path: Path) -> None:
    import zipfile

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nalpha")
    (folder / "b.txt").write_text("bravo")
    with zipfile.ZipFile(folder / "c.zip", "w") as zf:
        zf.writestr("one.md", "# One\n\nfirst")
        zf.writestr("two.md", "# Two\n\nsecond")
    root = [str(folder.resolve())]
    ingestor.ingest(walk([folder]), "c")
    names = lambda: sorted(d["source"].rsplit("/", 1)[-1] for d in store.documents("c"))  # noqa: E731
    assert names() == ["a.md", "b.txt", "one.md", "two.md"]
    # a walk that selects only Markdown proves nothing about the other files
    report = ingestor.ingest(walk([folder], "*.md"), "c", sync_prefixes=root, sync_glob="*.md")
    assert report.removed == [] and len(names()) == 4
    # an archive that cannot be read proves nothing about its entries; b.txt is gone
    (folder / "c.zip").write_bytes((folder / "c.zip").read_bytes()[:40])
    (folder / "b.txt").unlink()
    report = ingestor.ingest(walk([folder]), "c", sync_prefixes=root)
    assert [Path(s).name for s in report.removed] == ["b.txt"]
    assert names() == ["a.md", "one.md", "two.md"]
