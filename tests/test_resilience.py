"""Crash safety and clear failures of writes, with real `rag ingest` processes on real tables:
SIGKILL at random points, two ingests at once, a full disk and a read-only database location
(the last two on a tmpfs / read-only bind mount in a private mount namespace)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import lancedb
import pytest

from ingest.pipeline import Ingestor, walk
from rag_app.factory import Services

RAG = str(Path(sys.executable).with_name("rag"))
WORDS = ["harbour", "lantern", "quartz", "meadow", "falcon", "copper", "orchard", "glacier",
         "violin", "ember", "canyon", "saffron", "tide", "comet", "cedar", "lagoon", "basalt",
         "thistle", "beacon", "marble"]


def write_corpus(folder: Path, files: int, paragraphs: int = 6) -> Path:
    """Documents of several chunks each, every one with words of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    for i in range(files):
        paras = [" ".join(rng.choice(WORDS) for _ in range(60)) + f" doc{i}para{p}."
                 for p in range(paragraphs)]
        (folder / f"doc{i:03d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(paras))
    return folder


def chunks_by_source(uri: str, collection: str = "default") -> dict[str, set[tuple]]:
    db = lancedb.connect(uri)
    if collection not in db.list_tables().tables:
        return {}
    rows = db.open_table(collection).to_arrow().select(["source", "id", "text", "doc_hash"])
    out: dict[str, set[tuple]] = defaultdict(set)
    for r in rows.to_pylist():
        out[r["source"]].add((r["id"], r["text"], r["doc_hash"]))
    return dict(out)


@pytest.fixture
def shell_env(env, tmp_path: Path) -> dict[str, str]:
    env.setenv("RAG_DB_URI", str(tmp_path / "db"))
    env.setenv("RAG_INGESTION__BATCH_CHUNKS", "16")  # many commits: many places to be killed
    return dict(os.environ)


@pytest.fixture
def reference(services: Services, tmp_path: Path) -> tuple[Path, dict[str, set[tuple]]]:
    """The corpus and what a clean, uninterrupted ingest stores for it."""
    corpus = write_corpus(tmp_path / "corpus", 30)
    uri = str(tmp_path / "reference")
    s = Services(services.settings.model_copy(update={"db_uri": uri}))
    s.__dict__["embedder"] = services.embedder
    Ingestor(s.embedder, s.store, s.settings.chunking).ingest(walk([corpus]), "default")
    return corpus, chunks_by_source(uri)


def assert_whole_documents(found: dict[str, set[tuple]], expected: dict[str, set[tuple]]) -> None:
    for source, chunks in found.items():
        assert chunks == expected[source], f"{source} is stored incompletely"


@pytest.mark.slow
def test_sigkill_during_ingest_leaves_whole_documents_and_a_rerun_completes(
        reference, shell_env: dict[str, str]) -> None:
    corpus, expected = reference
    assert all(len(c) >= 3 for c in expected.values())  # multi-chunk documents
    rng = random.Random(11)
    versions = Path(shell_env["RAG_DB_URI"]) / "default.lance" / "_versions"
    partial = 0
    for _ in range(5):
        before = len(list(versions.glob("*"))) if versions.exists() else 0
        proc = subprocess.Popen([RAG, "ingest", str(corpus)], env=shell_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill after one or two more commits, at a random moment of the next write.
        target = before + rng.randint(1, 2)
        while proc.poll() is None and (
                not versions.exists() or len(list(versions.glob("*"))) < target):
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = chunks_by_source(shell_env["RAG_DB_URI"])  # the table opens...
        assert_whole_documents(found, expected)  # ...and holds only whole documents
        partial += 0 < len(found) < len(expected)
    assert partial >= 3, "the kills did not land in the middle of ingests"
    done = subprocess.run([RAG, "ingest", str(corpus), "--json"], env=shell_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert chunks_by_source(shell_env["RAG_DB_URI"]) == expected
    hits = subprocess.run([RAG, "search", "doc7para3", "--mode", "fulltext", "--json"],
                          env=shell_env, capture_output=True, text=True, timeout=300)
    assert hits.returncode == 0, hits.stderr
    assert Path(json.loads(hits.stdout)["hits"][0]["source"]).name == "doc007.md"


@pytest.mark.slow
def test_two_ingests_at_once_both_finish_or_one_reports_busy(
        reference, shell_env: dict[str, str], tmp_path: Path) -> None:
    corpus, expected = reference
    half_a, half_b = tmp_path / "a", tmp_path / "b"
    half_a.mkdir(), half_b.mkdir()
    for i, f in enumerate(sorted(corpus.iterdir())):
        shutil.copy(f, half_a if i % 2 else half_b)
    procs = [subprocess.Popen([RAG, "ingest", str(d), str(corpus / "doc000.md")],
                              env=shell_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for d in (half_a, half_b)]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for code, err in outcomes:
        assert code == 0 or "busy" in err, err
    assert any(code == 0 for code, _ in outcomes)  # at most one may be turned away
    found = chunks_by_source(shell_env["RAG_DB_URI"])
    by_name = {Path(s).name: c for s, c in found.items()}
    expected_by_name = {Path(s).name: c for s, c in expected.items()}
    for name, chunks in by_name.items():  # sources differ by folder; ids/texts by name
        assert {t for _, t, _ in chunks} == {t for _, t, _ in expected_by_name[name]}
    if all(code == 0 for code, _ in outcomes):
        assert set(by_name) == set(expected_by_name)


def in_private_mount(script: str) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private mount namespace")
    return subprocess.run(["unshare", "-rm", "sh", "-ec", script], capture_output=True,
                          text=True, timeout=600)


def test_full_disk_fails_naming_rag_db_uri_and_keeps_the_index(
        shell_env: dict[str, str], tmp_path: Path) -> None:
    small = write_corpus(tmp_path / "small", 2, paragraphs=2)
    big = write_corpus(tmp_path / "big", 20)
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    r = in_private_mount(f"""
        mount -t tmpfs -o size=4m tmpfs {mnt}
        export RAG_DB_URI={mnt}/db
        {RAG} ingest {small} --json > {out}/first.json
        # Leave almost no room, then try to add a larger corpus.
        free=$(df -k --output=avail {mnt} | tail -1)
        dd if=/dev/zero of={mnt}/filler bs=1k count=$((free - 24)) 2>/dev/null
        {RAG} ingest {big} --json > {out}/second.json 2> {out}/second.err || echo $? > {out}/rc
        rm {mnt}/filler
        {RAG} docs --json > {out}/docs.json
    """)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "first.json").read_text())["ingested"] == 2
    assert (out / "rc").read_text().strip() == "1"
    err = (out / "second.err").read_text()
    assert "no space left" in err and "RAG_DB_URI" in err and "Traceback" not in err
    docs = json.loads((out / "docs.json").read_text())["documents"]
    assert sorted(Path(d["source"]).name for d in docs) == ["doc000.md", "doc001.md"]


def test_read_only_database_fails_naming_rag_db_uri_and_still_serves_searches(
        shell_env: dict[str, str], tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", 2, paragraphs=2)
    db = shell_env["RAG_DB_URI"]
    first = subprocess.run([RAG, "ingest", str(corpus)], env=shell_env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    (corpus / "new.md").write_text("# New\n\nA new note about lanterns.")
    out = tmp_path / "out"
    out.mkdir()
    r = in_private_mount(f"""
        mount --bind {db} {db} && mount -o remount,ro,bind {db}
        {RAG} ingest {corpus} 2> {out}/ingest.err || echo $? > {out}/rc
        RAG_RETRIEVAL__MIN_SIMILARITY=-1 {RAG} search "doc1para1" --mode fulltext --json \
            > {out}/search.json
    """)
    assert r.returncode == 0, r.stderr
    assert (out / "rc").read_text().strip() == "1"
    err = (out / "ingest.err").read_text()
    assert "read-only" in err and "RAG_DB_URI" in err and "Traceback" not in err
    hits = json.loads((out / "search.json").read_text())["hits"]
    assert Path(hits[0]["source"]).name == "doc001.md"
    assert len(chunks_by_source(db)) == 2
