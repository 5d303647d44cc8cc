"""`rag serve` as a client meets it: a real server process (the `rag` command, uvicorn) on a
free loopback port, over a LanceDB holding two demo notes, asked with the real `openai`
client and httpx. One server for the module, so the LLM loads once."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, OpenAI
from servers import RAG, ROOT, clean_env, start, stop

from ingest.pipeline import Ingestor, walk
from rag_app.factory import Services

DATA = ROOT / "data"
TOKEN = "tok-Zq81-never-in-the-log"
QUESTION = "How many tokens are in the GPT-2 vocabulary?"


@dataclass
class Server:
    url: str
    log: Path
    env: dict[str, str]

    def get(self, path: str, token: str | None = TOKEN, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=_auth(token), timeout=120, **kwargs)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                **kwargs) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={**_auth(TOKEN), **(headers or {})},
                             timeout=600, **kwargs)


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def base_env(services: Services, cache_dir: Path, tmp_path_factory) -> dict[str, str]:
    """A database with two demo notes (ingested here with the session's embedder)."""
    db = str(tmp_path_factory.mktemp("serve-db"))
    s = Services(services.settings.model_copy(update={"db_uri": db}))
    s.__dict__["embedder"] = services.embedder
    report = Ingestor(s.embedder, s.store, s.settings.chunking).ingest(
        walk([DATA / "bpe-tokenization.md", DATA / "lancedb.md"]), "default")
    assert not report.failed
    return {**clean_env(), "RAG_DB_URI": db, "RAG_LLM__CACHE_DIR": str(cache_dir),
            "RAG_GENERATION__MAX_NEW_TOKENS": "48", "RAG_UI__MAX_UPLOAD_MB": "1",
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(base_env: dict[str, str], tmp_path_factory) -> Iterator[Server]:
    env = {**base_env, "RAG_SERVE__TOKEN": TOKEN}
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    proc, url = start(env, log)
    yield Server(url, log, env)
    stop(proc)


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=600)


@pytest.mark.slow
def test_only_health_is_open_without_the_token(server: Server) -> None:
    assert server.get("/health", token=None).json() == {"status": "ok"}
    for path in ("/v1/models", "/v1/documents", "/docs", "/openapi.json", "/no/such/route"):
        for token in (None, "wrong-token", TOKEN + "x"):
            r = server.get(path, token=token)
            assert r.status_code == 401, (path, token, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in r.json()["error"]["message"]
    assert server.get("/openapi.json").json()["paths"].keys() >= {
        "/v1/chat/completions", "/v1/models", "/v1/search", "/v1/documents",
        "/v1/documents/{source}", "/health"}


@pytest.mark.slow
def test_models_list_through_the_openai_client(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["rag", "llm"]


@pytest.mark.slow
def test_model_llm_is_the_bare_generator_without_retrieval(client: OpenAI) -> None:
    c = client.chat.completions.create(model="llm", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."}])
    assert c.model == "llm" and c.choices[0].message.content
    assert 0 < c.usage.completion_tokens <= 6
    assert c.choices[0].finish_reason in ("stop", "length")
    assert "sources" not in (c.model_extra or {}) and "rag" not in (c.model_extra or {})
    with pytest.raises(BadRequestError, match="without retrieval"):
        client.chat.completions.create(model="llm", extra_body={"k": 2}, messages=[
            {"role": "user", "content": "Name a colour."}])


@pytest.mark.slow
def test_chat_completion_answers_with_its_sources(client: OpenAI) -> None:
    c = client.chat.completions.create(model="rag", messages=[
        {"role": "user", "content": QUESTION}])
    assert c.object == "chat.completion" and c.model == "rag"
    answer = c.choices[0].message.content
    assert answer and c.choices[0].finish_reason in ("stop", "length")
    rag = c.model_extra["rag"]
    sources = c.model_extra["sources"]
    assert rag["answer"] == answer and rag["sources"] == sources
    assert Path(sources[0]["source"]).name == "bpe-tokenization.md"
    assert {"n", "source", "page", "text", "score"} <= sources[0].keys()
    assert set(rag["cited"]) <= {s["n"] for s in sources}
    assert rag["found"] and rag["device"] == "cpu" and rag["timings"]["generate_ms"] > 0


@pytest.mark.slow
def test_streamed_answer_comes_in_pieces_and_matches_the_whole_one(client: OpenAI) -> None:
    whole = client.chat.completions.create(model="rag", temperature=0, messages=[
        {"role": "user", "content": QUESTION}])
    stream = client.chat.completions.create(model="rag-test", stream=True, temperature=0,
                                            messages=[{"role": "user", "content": QUESTION}])
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].model == "rag-test"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert Path(chunks[0].model_extra["sources"][0]["source"]).name == "bpe-tokenization.md"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) >= 2  # token by token, not one block
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    rag = chunks[-1].model_extra["rag"]
    assert rag["answer"] == whole.choices[0].message.content  # greedy: the same answer
    text = "".join(pieces)
    assert text == rag["answer"] or text.endswith(f"-> {rag['answer']}")


@pytest.mark.slow
def test_earlier_user_messages_are_the_conversation(client: OpenAI) -> None:
    c = client.chat.completions.create(model="rag", max_tokens=8, messages=[
        {"role": "system", "content": "ignored: the app writes its own prompt"},
        {"role": "user", "content": "What does LanceDB's hybrid search combine?"},
        {"role": "assistant", "content": "Vector search and full-text search [1]"},
        {"role": "user", "content": "And how are they merged?"}])
    rag = c.model_extra["rag"]
    assert rag["question"] == "And how are they merged?"
    assert rag["query"] == "What does LanceDB's hybrid search combine? And how are they merged?"
    assert len(rag["tokens"]) <= 8


@pytest.mark.slow
def test_unsupported_or_invalid_chat_fields_are_400_with_a_message(client: OpenAI) -> None:
    question = [{"role": "user", "content": QUESTION}]
    cases = [({"n": 2}, "n = 2 is not supported"),
             ({"temperature": 9}, "temperature"),
             ({"top_p": 1.5}, "top_p"),
             ({"stop": ["\n"]}, "stop"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
             ({"extra_body": {"num_beams": 2}, "temperature": 0.5}, "num_beams"),
             ({"extra_body": {"collection": "no such"}}, "collection")]
    for fields, named in cases:
        for stream in (False, True):
            with pytest.raises(BadRequestError) as e:
                client.chat.completions.create(model="rag", messages=question, stream=stream,
                                               **fields)
            message = e.value.body["message"]
            assert named in message and "Traceback" not in message, (fields, message)
    with pytest.raises(BadRequestError, match="last user message"):
        client.chat.completions.create(model="rag", messages=[
            {"role": "system", "content": "no question here"}])


@pytest.mark.slow
def test_search_returns_the_passages_as_rag_search_json(server: Server) -> None:
    r = server.request("POST", "/v1/search", json={
        "query": "reciprocal rank fusion hybrid reranker", "k": 2, "mode": "hybrid"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["query"] == "reciprocal rank fusion hybrid reranker" and len(out["hits"]) == 2
    assert Path(out["hits"][0]["source"]).name == "lancedb.md"
    assert [h["n"] for h in out["hits"]] == [1, 2]
    bad = server.request("POST", "/v1/search", json={"query": "x", "mode": "semantic"})
    assert bad.status_code == 400 and "mode" in bad.json()["error"]["message"]


@pytest.mark.slow
def test_documents_upload_list_delete(server: Server, pdf_bytes) -> None:
    files = [("files", ("notes/../quokka.md", b"# Quokkas\n\nThe quokka lives on "
                        b"Rottnest Island.\n", "text/markdown")),
             ("files", ("manual.pdf", pdf_bytes(["Lanterns are lit at dusk."]),
                        "application/pdf")),
             ("files", ("broken.docx", b"not a docx", "application/octet-stream")),
             ("files", ("huge.txt", b"x" * (1024 * 1024 + 1), "text/plain"))]
    r = server.request("POST", "/v1/documents", files=files, data={"collection": "uploads"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ingested"] == 2 and report["chunks"] >= 2
    failed = {f["path"]: f["error"] for f in report["failed"]}
    assert failed.keys() == {"upload/broken.docx", "upload/huge.txt"}
    assert "cannot parse .docx" in failed["upload/broken.docx"]
    assert failed["upload/huge.txt"] == "larger than ui.max_upload_mb=1"
    again = server.request("POST", "/v1/documents", files=files[:1],
                           data={"collection": "uploads"}).json()
    assert again["unchanged"] == 1 and again["chunks"] == 0
    other = [("files", ("quokka.md", b"# Another quokka note\n\nIt is nocturnal.\n",
                        "text/markdown"))]  # another user's file of the same name
    taken = server.request("POST", "/v1/documents", files=other,
                           data={"collection": "uploads"}).json()
    assert taken["ingested"] == 0 and "already in the collection" in taken["failed"][0]["error"]
    restore = server.request("POST", "/v1/documents", files=other,
                             data={"collection": "uploads", "replace": "true"}).json()
    assert restore["ingested"] == 1

    listed = server.get("/v1/documents", params={"collection": "uploads"}).json()
    assert listed["collection"] == "uploads"
    assert [d["source"] for d in listed["documents"]] == ["upload/manual.pdf",
                                                          "upload/quokka.md"]
    assert "rag:uploads" in [m["id"] for m in server.get("/v1/models").json()["data"]]

    gone = server.request("DELETE", "/v1/documents/upload/quokka.md",
                          params={"collection": "uploads"})
    assert gone.status_code == 200 and gone.json()["deleted_chunks"] >= 1
    listed = server.get("/v1/documents", params={"collection": "uploads"}).json()
    assert [d["source"] for d in listed["documents"]] == ["upload/manual.pdf"]
    missing = server.request("DELETE", "/v1/documents/upload/quokka.md",
                             params={"collection": "uploads"})
    assert missing.status_code == 404 and "upload/quokka.md" in missing.json()["error"][
        "message"]
    default = server.get("/v1/documents").json()["documents"]
    assert sorted(Path(d["source"]).name for d in default) == ["bpe-tokenization.md",
                                                               "lancedb.md"]


@pytest.mark.slow
def test_errors_are_json_never_tracebacks(server: Server) -> None:
    cases = [server.get("/no/such/route"),
             server.request("PUT", "/v1/models"),
             server.request("POST", "/v1/search", content=b"{not json",
                            headers={"Content-Type": "application/json"}),
             server.get("/v1/documents", params={"collection": "../etc"}),
             server.request("POST", "/v1/chat/completions", json={
                 "model": "rag:empty", "messages": [{"role": "user", "content": QUESTION}]})]
    assert [r.status_code for r in cases] == [404, 405, 400, 400, 404]
    for r in cases:
        assert set(r.json()) == {"error"} and r.json()["error"]["message"]
        assert "Traceback" not in r.text
    assert "no documents" in cases[-1].json()["error"]["message"]


@pytest.mark.slow
def test_cli_asks_and_searches_through_the_server(server: Server, tmp_path: Path) -> None:
    # an empty database of its own: every answer must come from the server
    env = {**server.env, "RAG_SERVE__URL": server.url, "RAG_DB_URI": str(tmp_path / "empty")}
    run = lambda *a, **e: subprocess.run([RAG, *a], capture_output=True, text=True,  # noqa: E731
                                         timeout=600, env={**env, **e})
    r = run("search", "reciprocal rank fusion hybrid reranker", "--k", "2", "--json")
    assert r.returncode == 0, r.stderr
    direct = server.request("POST", "/v1/search", json={
        "query": "reciprocal rank fusion hybrid reranker", "k": 2}).json()
    assert json.loads(r.stdout) == direct

    r = run("ask", QUESTION, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    whole = server.request("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert out["answer"] == whole["choices"][0]["message"]["content"]
    assert out["sources"] == whole["sources"] and out["model"] == whole["rag"]["model"]

    r = run("ask", QUESTION)
    assert r.returncode == 0, r.stderr
    assert out["answer"].split(" [")[0] in r.stdout and "bpe-tokenization.md" in r.stdout

    r = run("ask", QUESTION, "--top-p", "1.5")
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr
    r = run("ask", QUESTION, RAG_SERVE__TOKEN="wrong")
    assert r.returncode == 1 and "RAG_SERVE__TOKEN" in r.stderr


@pytest.mark.slow
def test_without_a_token_only_this_machines_names_are_answered(base_env, tmp_path) -> None:
    proc, url = start(dict(base_env), tmp_path / "open.log")
    try:
        assert httpx.get(url + "/v1/documents", timeout=120).status_code == 200
        for headers in ({"Host": "rebound.example"}, {"Origin": "http://rebound.example"}):
            r = httpx.get(url + "/v1/documents", headers=headers, timeout=120)
            assert r.status_code == 403 and "own address" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/documents", headers={"Host": "localhost"},
                         timeout=120).status_code == 200
    finally:
        stop(proc)


@pytest.mark.slow
def test_the_token_is_never_logged(server: Server) -> None:
    server.get("/v1/models", token="wrong-token")  # a refusal is logged
    server.get("/v1/models")
    log = server.log.read_text()
    assert "refused GET /v1/models" in log and "bearer token required" in log
    assert TOKEN not in log and "wrong-token" not in log


def test_beyond_loopback_without_a_token_refuses_tostart(tmp_path: Path) -> None:
    r = subprocess.run([RAG, "serve", "--host", "0.0.0.0"], capture_output=True, text=True,
                       timeout=120, env={**clean_env(), "RAG_DB_URI": str(tmp_path / "db")})
    assert r.returncode == 2
    assert "serve.token" in r.stderr and "RAG_SERVE__TOKEN" in r.stderr
    assert "Traceback" not in r.stderr
