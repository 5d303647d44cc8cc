"""The `rag` command as a user runs it: a real subprocess, real exit codes and output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RAG = str(Path(sys.executable).with_name("rag"))
DATA = Path(__file__).resolve().parent.parent / "data"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RAG, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def db(tmp_path: Path, env) -> str:
    uri = str(tmp_path / "db")
    env.setenv("RAG_DB_URI", uri)
    return uri


def test_ingest_json_reports_bad_files_and_ingests_the_rest(tmp_path: Path, db: str) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DATA / "lancedb.md", docs)
    shutil.copy(DATA / "chunking.md", docs)
    (docs / "broken.docx").write_bytes(b"not a docx")
    r = run("ingest", str(docs), "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["files"] == 2 and out["chunks"] > 2
    assert [Path(f["path"]).name for f in out["failed"]] == ["broken.docx"]
    assert "cannot parse .docx" in out["failed"][0]["error"]
    # progress for scripts: a JSON line on stderr per file, by files, chunks and bytes
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    per_file = [p for p in lines if p["event"] == "file"]
    assert sorted(Path(p["path"]).name for p in per_file) == ["broken.docx", "chunking.md",
                                                             "lancedb.md"]
    last = per_file[-1]
    size = sum(f.stat().st_size for f in docs.iterdir())
    assert last["files_done"] == last["files_total"] == 3 and last["failed"] == 1
    assert last["bytes_done"] == last["bytes_total"] == size and last["chunks"] == out["chunks"]
    assert last["eta_s"] == 0 and last["bytes_per_s"] > 0
    again = json.loads(run("ingest", str(docs / "lancedb.md"), "--json").stdout)
    assert again == {**again, "unchanged": 1, "chunks": 0, "failed": []}

    listed = json.loads(run("docs", "--json").stdout)["documents"]
    assert sorted(Path(d["source"]).name for d in listed) == ["chunking.md", "lancedb.md"]
    assert run("delete", str(docs / "chunking.md")).returncode == 0
    listed = json.loads(run("docs", "--json").stdout)["documents"]
    assert [Path(d["source"]).name for d in listed] == ["lancedb.md"]


def test_two_db_uris_never_share_data(tmp_path: Path, env) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run("ingest", str(DATA / "lancedb.md"), env={"RAG_DB_URI": a}).returncode == 0
    r = run("search", "hybrid search", env={"RAG_DB_URI": b})
    assert r.returncode == 1 and "no documents" in r.stderr


@pytest.mark.slow
def test_search_and_ask_json(demo_index, env) -> None:
    demo_index.lm  # noqa: B018 - the converted model is in the session cache before the CLI runs
    r = run("search", "How many tokens are in the GPT-2 vocabulary?", "--k", "3", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 3 and Path(hits[0]["source"]).name == "bpe-tokenization.md"
    assert {"n", "source", "page", "text", "score"} <= hits[0].keys()

    r = run("ask", "How many tokens are in the GPT-2 vocabulary?", "--json",
            "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"answer", "sources", "cited", "model", "device", "timings", "tokens"} <= out.keys()
    assert out["answer"].strip() and out["device"] == "cpu"
    # llm.engine=auto: the fast decoder where its native kernels run, else generate
    native = torch.backends.cpu.get_cpu_capability() == "AVX512"  # built in the session cache
    assert out["engine"] == ("fast decoder, native kernels" if native
                             else "transformers generate")
    assert out["dtype"] == ("int4 weights, bfloat16" if native else "float32")
    assert {"retrieve_ms", "first_token_ms", "generate_ms", "tokens_per_s"} <= out[
        "timings"].keys()

    r = run("ask", "What is the capital of Peru?")
    assert r.returncode == 0 and "could not find" in r.stdout


def test_ask_on_empty_index_is_a_clear_error(db: str) -> None:
    r = run("ask", "anything?")
    assert r.returncode == 1
    assert "no documents" in r.stderr and "rag ingest" in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_setting_fails_at_start_naming_it(db: str) -> None:
    r = run("search", "x", env={"RAG_RETRIEVAL__K": "0"})
    assert r.returncode == 2
    assert "retrieval.k (RAG_RETRIEVAL__K)" in r.stderr and "Traceback" not in r.stderr


def test_invalid_decoding_option_names_it(demo_index, env) -> None:
    r = run("ask", "What is BPE?", "--top-p", "1.5")
    assert r.returncode == 2 and "generation.top_p" in r.stderr


def test_ui_beyond_loopback_without_a_password_refuses_to_start(db: str) -> None:
    r = run("ui", "--host", "0.0.0.0")
    assert r.returncode == 2 and "ui.password" in r.stderr and "Traceback" not in r.stderr


def test_cli_output_escapes_terminal_control_from_documents(tmp_path: Path, db: str) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    # a right-to-left override makes this name display as "quokkatxt.exe.md"; ESC ] sets
    # the terminal's title, ESC [2J clears the screen
    (folder / "quokka\u202edm.exe.txt").write_text(
        "The quokka \x1b]0;pwned\x07 lives on Rottnest Island.\x1b[2J\n", encoding="utf-8")
    assert run("ingest", str(folder)).returncode == 0
    for args in (("docs",), ("search", "quokka island")):
        r = run(*args)
        assert r.returncode == 0 and "quokka" in r.stdout, r.stderr
        assert not {"\x1b", "\x07", "\u202e"} & set(r.stdout), r.stdout
        assert "\\u202e" in r.stdout  # shown, not obeyed


def test_sync_of_a_missing_folder_removes_nothing(tmp_path: Path, db: str) -> None:
    folder = tmp_path / "mounted"
    folder.mkdir()
    (folder / "note.md").write_text("# Note\n\nThe quokka lives on Rottnest Island.")
    assert run("ingest", str(folder)).returncode == 0
    folder.rename(tmp_path / "elsewhere")  # unmounted, renamed: not proof the files are gone
    r = run("ingest", "--sync", "--json", str(folder))
    assert json.loads(r.stdout)["removed"] == [], r.stdout
    assert "note.md" in run("docs").stdout


@pytest.mark.parametrize(("args", "extra", "says"), [
    (("search", "x", "--page", "99999999999"), {},
     "Invalid value for '--page': Input should be less than or equal to 2147483647"),
    (("search", "x", "--page", "0"), {},
     "Invalid value for '--page': Input should be greater than or equal to 1"),
    (("ingest", str(DATA / "lancedb.md"), "--collection", "日本語"), {},
     "invalid setting collection (RAG_COLLECTION)"),
    (("docs",), {"RAG_COLLECTION": "x" * 300}, "collection must be at most 128 characters"),
    (("ingest", str(DATA / "lancedb.md")), {"RAG_DB_URI": ""},
     "invalid setting db_uri (RAG_DB_URI): Value error, db_uri must not be empty"),
])
def test_bad_options_are_one_line_errors_with_exit_2(tmp_path: Path, db: str, args: tuple,
                                                     extra: dict, says: str) -> None:
    r = subprocess.run([RAG, *args], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**os.environ, **extra})
    assert r.returncode == 2, r.stderr
    assert says in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be written"  # db is tmp_path/db


def test_a_mistyped_variable_is_warned_about(db: str) -> None:
    r = run("docs", env={"RAG_RETRIEVAL__KK": "3"})
    assert "unknown environment variable RAG_RETRIEVAL__KK" in r.stderr
    assert "did you mean RAG_RETRIEVAL__K?" in r.stderr
