import shutil
from pathlib import Path

import pytest

from ingest.pipeline import Ingestor, SourceFile, walk
from rag_app.errors import EmbeddingMismatchError, EmptyIndexError
from rag_app.settings import IngestionSettings
from rag_app.store import ChunkStore

DATA = Path(__file__).resolve().parent.parent / "data"
LIMITS = IngestionSettings()


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


def test_an_upload_never_replaces_another_document_of_its_name_unless_asked(
        ingestor: Ingestor, store: ChunkStore) -> None:
    def up(text: bytes) -> SourceFile:
        return SourceFile("upload/report.md", lambda: text)

    first = b"# Report\n\nQuokkas live on Rottnest Island."
    ingestor.ingest([up(first)], "c", replace=False)
    second = ingestor.ingest([up(b"# Report\n\nWombats dig burrows.")], "c", replace=False)
    (result,) = second.results
    assert result.status == "failed" and "already in the collection" in result.error
    kept = store.search("c", "Rottnest", ingestor.embedder.embed_query("Rottnest"), 5, "vector")
    assert [h.text for h in kept] and all("Quokkas" in h.text for h in kept)
    again = ingestor.ingest([up(first)], "c", replace=False)  # the same file: unchanged
    assert again.results[0].status == "unchanged"
    replaced = ingestor.ingest([up(b"# Report\n\nWombats dig burrows.")], "c", replace=True)
    assert replaced.results[0].status == "ingested"
    hits = store.search("c", "burrows", ingestor.embedder.embed_query("burrows"), 5, "vector")
    assert hits and all("Wombats" in h.text for h in hits)


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
        load_document(buf.getvalue(), "scan.pdf", LIMITS)


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
    # the dry run lists what the sync will remove, and changes nothing
    assert [Path(s).name for s in ingestor.sync_plan(walk([folder]), "c", root)] == ["b.txt"]
    assert [Path(s).name for s in ingestor.sync_plan(walk([folder], "*.md"), "c", root,
                                                     "*.md")] == []
    assert len(names()) == 4
    report = ingestor.ingest(walk([folder]), "c", sync_prefixes=root)
    assert [Path(s).name for s in report.removed] == ["b.txt"]
    assert names() == ["a.md", "one.md", "two.md"]


def _nested_forms_pdf(depth: int = 4, fan: int = 10, leaf_ops: int = 200) -> bytes:
    """A one-page PDF of some 20 KB whose page draws a form that draws another `fan` times,
    `depth` levels down, each leaf drawing `leaf_ops` strings: pypdf's text extraction
    stops at 5,000 form invocations, after a million text operations (minutes)."""
    import io

    from pypdf import PdfWriter
    from pypdf.generic import ArrayObject, DecodedStreamObject, DictionaryObject, NameObject
    from pypdf.generic import NumberObject as N

    writer = PdfWriter()
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                             NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    fonts = DictionaryObject({NameObject("/F1"): font})
    inner = None
    for _ in range(depth + 1):
        form = DecodedStreamObject()
        form.update({NameObject("/Type"): NameObject("/XObject"),
                     NameObject("/Subtype"): NameObject("/Form"),
                     NameObject("/BBox"): ArrayObject([N(0), N(0), N(600), N(800)])})
        resources = DictionaryObject({NameObject("/Font"): fonts})
        if inner is None:
            form.set_data(b"BT /F1 10 Tf 20 700 Td " + b"(lol) Tj " * leaf_ops + b"ET")
        else:
            resources[NameObject("/XObject")] = DictionaryObject({NameObject("/X"): inner})
            form.set_data(b"/X Do " * fan)
        form[NameObject("/Resources")] = resources
        inner = writer._add_object(form)
    page = writer.add_blank_page(600, 800)
    content = DecodedStreamObject()
    content.set_data(b"/X Do")
    page[NameObject("/Contents")] = writer._add_object(content)
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/XObject"): DictionaryObject({NameObject("/X"): inner}),
         NameObject("/Font"): fonts})
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def _names(store: ChunkStore) -> dict[str, int]:
    return {d["source"].rsplit("/", 1)[-1]: d["chunks"] for d in store.documents("c")}


def test_a_file_over_the_parse_time_limit_is_stopped_and_the_batch_goes_on(
        services, store: ChunkStore, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "kept.md").write_text("# Kept\n\nStored before the slow batch.")
    ingestor = Ingestor(services.embedder, store, services.settings.chunking,
                        _limits(parse_timeout_s=1))
    ingestor.ingest(walk([folder]), "c")
    before = store.documents("c")
    (folder / "forms.pdf").write_bytes(_nested_forms_pdf())
    (folder / "later.md").write_text("# After\n\nParsed by a new parser process.")
    report = ingestor.ingest(walk([folder]), "c").to_json()
    assert report["failed"] == [{"path": str((folder / "forms.pdf").resolve()), "error":
        "over the parse time limit of 1 s (ingestion.parse_timeout_s): not parsed"}]
    assert (report["ingested"], report["unchanged"]) == (1, 1)
    assert _names(store) == {"kept.md": 1, "later.md": 1}
    assert [d for d in store.documents("c") if d["source"].endswith("kept.md")] == before
    assert ingestor.parser.starts == 2  # the stopped process was replaced, once


def test_a_file_over_the_memory_limit_is_reported_and_the_batch_goes_on(
        services, store: ChunkStore, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nSmall enough.")
    (folder / "b.txt").write_bytes("Café au lait. ".encode("cp1252") * 1_500_000)  # 21 MB
    (folder / "c.md").write_text("# C\n\nSmall too.")
    ingestor = Ingestor(services.embedder, store, services.settings.chunking,
                        _limits(parse_memory_mb=16))
    report = ingestor.ingest(walk([folder]), "c").to_json()
    (failed,) = report["failed"]
    assert failed["path"].endswith("b.txt")
    assert "memory limit of 16 MB (ingestion.parse_memory_mb)" in failed["error"]
    assert _names(store) == {"a.md": 1, "c.md": 1}


def test_one_parser_process_serves_the_whole_batch(ingestor: Ingestor, corpus: Path) -> None:
    assert ingestor.ingest(walk([corpus]), "c").to_json()["ingested"] == 8
    assert ingestor.parser.starts == 1


def test_a_pdf_over_the_page_cap_is_reported_not_parsed(services, store: ChunkStore,
                                                         tmp_path: Path) -> None:
    import io

    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(2000):
        writer.add_blank_page(200, 200)
    buf = io.BytesIO()
    writer.write(buf)
    (tmp_path / "long.pdf").write_bytes(buf.getvalue())
    ingestor = Ingestor(services.embedder, store, services.settings.chunking,
                        _limits(max_pdf_pages=1000))
    (failed,) = ingestor.ingest(walk([tmp_path / "long.pdf"]), "c").failed
    assert failed.error == "2000 pages, more than ingestion.max_pdf_pages=1000: not parsed"


def test_a_docx_that_unpacks_beyond_the_file_limit_is_refused_before_parsing(
        services, store: ChunkStore, tmp_path: Path) -> None:
    import io
    import zipfile

    import docx

    d = docx.Document()
    d.add_paragraph("A normal paragraph.")
    buf = io.BytesIO()
    d.save(buf)
    bomb = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "word/document.xml":  # the text, then 50 MB of blanks
                data = data.replace(b"</w:body>", b" " * 50_000_000 + b"</w:body>")
            dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
    assert len(bomb.getvalue()) < 200_000
    (tmp_path / "bomb.docx").write_bytes(bomb.getvalue())
    ingestor = Ingestor(services.embedder, store, services.settings.chunking,
                        _limits(max_file_mb=1, parse_memory_mb=16))
    (failed,) = ingestor.ingest(walk([tmp_path / "bomb.docx"]), "c").failed
    assert failed.error == "unpacks to 48 MB, more than ingestion.max_file_mb=1: not parsed"


def test_nested_archives_are_reported_as_skipped(ingestor: Ingestor, store: ChunkStore,
                                                 tmp_path: Path) -> None:
    import io
    import zipfile

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("deep.md", "# Deep\n\nInside the inner archive.")
    with zipfile.ZipFile(tmp_path / "outer.zip", "w") as zf:
        zf.writestr("inner.zip", inner.getvalue())
        zf.writestr("top.md", "# Top\n\nIn the outer archive.")
    report = ingestor.ingest(walk([tmp_path / "outer.zip"]), "c").to_json()
    assert report["skipped"] == [{"path": str((tmp_path / "outer.zip").resolve()) +
                                  "/inner.zip", "reason": "a zip inside a zip: not opened "
                                  "(unzip it and ingest its files)"}]
    assert (report["ingested"], report["files"], report["failed"]) == (1, 1, [])
    assert _names(store) == {"top.md": 1}


def test_two_files_with_one_name_are_reported_not_merged(ingestor: Ingestor,
                                                         store: ChunkStore,
                                                         tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("a.md", "# First\n\nThe first a.md.")
        zf.writestr("../a.md", "# Second\n\nAnother file, labelled a.md too.")
    uploads = [SourceFile("upload/note.md", lambda: b"# One\n\nBananas are yellow."),
               SourceFile("upload/note.md", lambda: b"# Two\n\nCherries are red.")]
    report = ingestor.ingest([*walk([tmp_path / "two.zip"]), *uploads], "c").to_json()
    same_name = "another file in this batch has the same name: only the first is ingested " \
                "(rename one)"
    assert [(Path(f["path"]).name, f["error"]) for f in report["failed"]] == [
        ("a.md", same_name), ("note.md", same_name)]
    assert report["ingested"] == 2 and report["chunks"] == 2
    texts = set(store.db.open_table("c").to_arrow()["text"].to_pylist())
    assert texts == {"The first a.md.", "Bananas are yellow."}
    # the same file given twice is one document, ingested once
    (tmp_path / "same.md").write_text("# Same\n\nGiven twice.")
    twice = ingestor.ingest(walk([tmp_path / "same.md", tmp_path / "same.md"]), "c").to_json()
    assert sorted(r["status"] for r in twice["results"] if r["path"].endswith("same.md")
                  ) == ["ingested", "unchanged"]
    assert twice["failed"] == [] and _names(store)["same.md"] == 1


def test_printed_page_labels_are_stored_searched_by_physical_page_and_cited(
        services, store: ChunkStore, tmp_path: Path) -> None:
    """amsldoc's PDF pages 2, 5 and 29 (printed ii, 1, 25), into a table made before the
    page_label column: it reads as it is, gains the column on the write that brings a
    label, and --page still filters by the physical page."""
    import pyarrow as pa

    from rag_app.chain import source_json
    from rag_app.citations import page_reference
    from rag_app.retriever import LanceRetriever
    from rag_app.store import LABEL_COLUMN, chunk_schema
    from ui.render import source_title

    old = chunk_schema(store.dim, store.embedding_model)
    store.db.create_table("c", schema=pa.schema(
        [f for f in old if f.name != LABEL_COLUMN], metadata=old.metadata))
    ingestor = Ingestor(services.embedder, store, services.settings.chunking)
    ingestor.ingest(walk([DATA / "lancedb.md"]), "c")
    assert LABEL_COLUMN not in store.db.open_table("c").schema.names  # nothing to add yet
    pdf = Path(__file__).resolve().parent / "corpus" / "amsldoc-pages.pdf"
    shutil.copyfile(pdf, tmp_path / "amsldoc.pdf")
    report = ingestor.ingest(walk([tmp_path / "amsldoc.pdf"]), "c")
    assert not report.failed
    assert LABEL_COLUMN in store.db.open_table("c").schema.names
    retriever = LanceRetriever(store=store, embedder=services.embedder, collection="c",
                               settings=services.settings.retrieval, min_similarity=-1)
    (doc,) = retriever.invoke("poor man's bold", page=3, k=1, mode="fulltext")
    assert (doc.metadata["page"], doc.metadata["page_label"]) == (3, "25")
    hit = source_json(1, doc)
    assert page_reference(hit["page"], hit["page_label"]) == "p. 25 (PDF page 3)"
    assert "p\\. 25 \\(PDF page 3\\)" in source_title(hit, cited=True)
    (md,) = retriever.invoke("LanceDB", source=str((DATA / "lancedb.md").resolve()), k=1)
    assert md.metadata["page_label"] is None  # written before the column existed


def test_page_reference_shows_the_printed_label_only_where_it_differs() -> None:
    from rag_app.citations import page_reference

    assert page_reference(29, "25") == "p. 25 (PDF page 29)"
    assert page_reference(4, "iv") == "p. iv (PDF page 4)"
    assert page_reference(7, "7") == page_reference(7, None) == "p. 7"
    assert page_reference(None, "3") == ""


def test_uploads_keep_their_originals_within_the_limit_deleted_with_the_document(
        services, tmp_path: Path, corpus: Path) -> None:
    from ingest.pipeline import uploaded
    from rag_app.originals import NOT_KEPT, OriginalStore, open_source, originals_uri

    originals = OriginalStore(originals_uri(str(tmp_path / "db")))
    store = ChunkStore(str(tmp_path / "db"), services.embedder.name, services.embedder.dim,
                       originals=originals)
    ingestor = Ingestor(services.embedder, store, services.settings.chunking,
                        keep_originals_mb=0.01)  # 10 KiB
    small = b"# Notes\n\nThe Zorblat reactor produces 42 gigawatts.\n"
    big = b"# Big\n\n" + b"A long line of text about reactors.\n" * 400  # 14 KiB
    steps = []
    report = ingestor.ingest([uploaded("notes.md", len(small), lambda: small, 1),
                              uploaded("big.md", len(big), lambda: big, 1),
                              *walk([corpus / "chunking.md"])], "c", steps=steps.append)
    assert report.to_json()["ingested"] == 3
    # each file was reported as it was read, the batch's embedding chunk by chunk
    assert [s.path for s in steps if s.stage == "reading"] == [
        "upload/notes.md", "upload/big.md", str((corpus / "chunking.md").resolve())]
    embedding = [s for s in steps if s.stage == "embedding"]
    assert embedding and embedding[0].chunks_done == 0 and embedding[0].files == 3
    assert embedding[-1].chunks_total == report.to_json()["chunks"]
    # only the upload within the limit is kept; a folder's file is opened from its path
    assert originals.sources("c") == {"upload/notes.md"}
    hashes = store.document_hashes("c")
    opened = open_source(originals, "c", "upload/notes.md", hashes["upload/notes.md"], 2**20)
    assert opened.data == small and not opened.changed
    assert open_source(originals, "c", "upload/big.md", None, 2**20).problem == NOT_KEPT
    on_disk = str((corpus / "chunking.md").resolve())
    assert open_source(originals, "c", on_disk, hashes[on_disk], 2**20).data == (
        corpus / "chunking.md").read_bytes()
    (corpus / "chunking.md").write_text("# Chunking\n\nedited since")
    assert open_source(originals, "c", on_disk, hashes[on_disk], 2**20).changed
    (corpus / "chunking.md").unlink()
    assert "no longer at" in open_source(originals, "c", on_disk, None, 2**20).problem
    store.delete_documents("c", ["upload/notes.md"])
    assert originals.sources("c") == set()
    assert open_source(originals, "c", "upload/notes.md", None, 2**20).problem == NOT_KEPT


def test_a_zip_entry_on_disk_opens_from_its_archive(tmp_path: Path) -> None:
    import zipfile

    from rag_app.originals import open_source

    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../inner/a.md", "# A\n\ntext")
    assert open_source(None, "c", f"{archive}/inner/a.md", None, 2**20).data == b"# A\n\ntext"
    assert "no longer" in open_source(None, "c", f"{archive}/inner/b.md", None, 2**20).problem
