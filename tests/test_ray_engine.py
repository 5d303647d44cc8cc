"""`ingestion.engine = ray` on a real local Ray (started once for the session): the same
chunk ids, texts, metadata and per-file report as the local engine, vectors within float
noise, and `rag ingest --engine ray` as a user runs it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ingest.pipeline import FileResult, Ingestor, IngestReport, walk
from rag_app.errors import MissingDependencyError
from rag_app.factory import Services
from rag_app.settings import IngestionSettings, load_settings
from rag_app.store import ChunkStore

DATA = Path(__file__).resolve().parent.parent / "data"
RAG = str(Path(sys.executable).with_name("rag"))


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for the session (2 CPUs, no dashboard); its address for other drivers."""
    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # lancedb's fork note: Ray fork+execs
        ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                       logging_level=logging.WARNING)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """The demo notes, a corrupt PDF, an empty file and a zip (its entries are shipped as
    bytes, the files are read by the workers)."""
    folder = tmp_path / "docs"
    shutil.copytree(DATA, folder, ignore=shutil.ignore_patterns("*.json"))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7 garbage, not a real PDF \x00\xff")
    (folder / "empty.txt").write_bytes(b"")
    with zipfile.ZipFile(folder / "bundle.zip", "w") as zf:
        zf.writestr("notes/a.md", "# Apples\n\nApples are red or green.")
        zf.writestr("notes/broken.docx", b"not a docx")
    return folder


@pytest.fixture
def store(tmp_path: Path, services) -> ChunkStore:
    return ChunkStore(str(tmp_path / "db"), services.embedder.name, services.embedder.dim)


def _ray_ingestor(services, store: ChunkStore, **limits):
    from ingest.ray_engine import RayIngestor

    return RayIngestor(services.embedder, store, services.settings.chunking,
                       IngestionSettings(**limits), services.settings.embedding)


def _results(report: IngestReport) -> list[tuple]:
    return sorted((r.path, r.status, r.chunks, r.error) for r in report.results)


def _table(store: ChunkStore, collection: str) -> tuple[list[dict], np.ndarray]:
    """Rows sorted by id without the ingest time, and their vectors."""
    table = store.db.open_table(collection).to_arrow().sort_by("id")
    vectors = np.array(table["vector"].to_pylist())
    return table.drop_columns(["vector", "ingested_at"]).to_pylist(), vectors


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine(ray_address, services, store: ChunkStore,
                                             corpus: Path, monkeypatch) -> None:
    import ingest.ray_engine

    local = Ingestor(services.embedder, store, services.settings.chunking)
    on_ray = _ray_ingestor(services, store)

    def inputs():  # lancedb.md twice: the second is unchanged in both engines
        return walk([corpus, corpus / "lancedb.md"])

    reports = {"local": local.ingest(inputs(), "local"), "ray": on_ray.ingest(inputs(), "ray")}
    # As a Ray Client (ray://) driver: it reads the files and ships their bytes, and Ray
    # Data runs in a coordinator actor on the cluster.
    monkeypatch.setattr(ingest.ray_engine, "is_client", lambda ray: True)
    reports["shipped"] = on_ray.ingest(inputs(), "shipped")
    monkeypatch.undo()
    expected = _results(reports["local"])
    failed = {Path(p).name: e for p, s, _, e in expected if s == "failed"}
    assert failed.keys() == {"broken.pdf", "empty.txt", "broken.docx"}
    assert sum(s == "ingested" for _, s, _, _ in expected) == 9  # 8 notes + the zip entry
    order = [i.path if isinstance(i, FileResult) else i.source
             for i in local._expanded(inputs())]
    rows, vectors = _table(store, "local")
    assert len(rows) == reports["local"].to_json()["chunks"] > 30
    for name in ("ray", "shipped"):
        assert _results(reports[name]) == expected, name
        assert [r.path for r in reports[name].results] == order, name  # input order
        got_rows, got_vectors = _table(store, name)
        assert got_rows == rows, name  # ids, texts, sources, pages, headings, offsets, hash
        np.testing.assert_allclose(got_vectors, vectors, atol=1e-5)

    # A second pass: one note changed, one gone; --sync removes it; the rest is unchanged.
    (corpus / "chunking.md").unlink()
    with (corpus / "lancedb.md").open("a") as f:
        f.write("\n\n## Added later\n\nA paragraph appended after the first ingest.\n")
    prefix = [str(corpus.resolve())]
    again = {"local": local.ingest(walk([corpus]), "local", sync_prefixes=prefix),
             "ray": on_ray.ingest(walk([corpus]), "ray", sync_prefixes=prefix)}
    assert _results(again["ray"]) == _results(again["local"])
    assert again["ray"].removed == again["local"].removed == [str(corpus.resolve() /
                                                                  "chunking.md")]
    summary = again["ray"].to_json()
    assert summary["ingested"] == 1 and summary["unchanged"] == 7
    got_rows, got_vectors = _table(store, "ray")
    rows, vectors = _table(store, "local")
    assert got_rows == rows
    np.testing.assert_allclose(got_vectors, vectors, atol=1e-5)
    hits = store.search("ray", "appended after the first ingest", services.embedder.embed_query(
        "appended after the first ingest"), k=1, mode="fulltext")
    assert hits and hits[0].source.endswith("lancedb.md")  # the full-text index was refreshed


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RAG, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_ingest_engine_ray(ray_address, tmp_path: Path, env) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DATA / "lancedb.md", docs)
    shutil.copy(DATA / "chunking.md", docs)
    (docs / "broken.docx").write_bytes(b"not a docx")
    env.setenv("RAG_DB_URI", str(tmp_path / "db"))

    r = run("ingest", str(docs), "--engine", "ray", "--json")  # starts its own local Ray
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["ingested"] == 2 and out["chunks"] > 2
    assert [Path(f["path"]).name for f in out["failed"]] == ["broken.docx"]
    assert "cannot parse .docx" in out["failed"][0]["error"]

    # Attached to a running cluster by address, as with a real one: nothing to redo.
    r = run("ingest", str(docs / "lancedb.md"), "--json",
            env={"RAG_INGESTION__ENGINE": "ray", "RAG_INGESTION__RAY_ADDRESS": ray_address})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {**json.loads(r.stdout), "unchanged": 1, "chunks": 0}
    listed = json.loads(run("docs", "--json").stdout)["documents"]
    assert sorted(Path(d["source"]).name for d in listed) == ["chunking.md", "lancedb.md"]


def test_unknown_engine_is_a_settings_error(tmp_path: Path, env) -> None:
    r = run("ingest", str(DATA / "lancedb.md"), "--engine", "spark")
    assert r.returncode == 2 and "ingestion.engine" in r.stderr


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    services = Services(load_settings(db_uri=str(tmp_path / "db"),
                                      ingestion={"engine": "ray"}))
    with pytest.raises(MissingDependencyError, match=r"pip install 'rag_app\[ray\]'"):
        services.ingestor()
    assert "embedder" not in services.__dict__  # refused before loading the model
    local = Services(load_settings(db_uri=str(tmp_path / "db")))
    assert type(local.ingestor()) is Ingestor
