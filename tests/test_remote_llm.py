"""The generator on a model server (llm.provider = openai, langchain-openai's ChatOpenAI),
against real OpenAI-compatible servers on loopback, over the session's demo index:

- this project's own `rag serve`, model `llm` (the bundled SmolLM2 answering the messages
  without retrieval), in another process: always;
- llama-cpp-python's server on the bundled GGUF, when the `llamacpp` extra is installed
  (it compiles llama.cpp from source, which is too slow for `make test`; README).

One server per module; the retrieval, prompt, citations and refusals are the app's own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from servers import clean_env, free_port, start, stop

from rag_app.chain import NO_PASSAGE, RagAnswer
from rag_app.errors import ModelServerError, SettingsError
from rag_app.factory import Services
from rag_app.locate import resolve_model_ref
from rag_app.prompt import NOT_FOUND
from rag_app.remote_llm import RemoteChatModel
from rag_app.server import create_app
from rag_app.settings import BUNDLED_LLM, load_settings

KEY = "sk-local-Rt5w-never-shown"
QUESTION = "How many tokens are in the GPT-2 vocabulary?"
CHAT_POST = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" 200')


@dataclass
class ModelServer:
    url: str  # the API root, up to /v1
    log: Path

    def answered(self) -> int:
        """Chat completions the server has answered so far (its access log)."""
        return len(CHAT_POST.findall(self.log.read_text()))


def remote_services(demo: Services, base_url: str, model: str = "llm", **llm: object
                    ) -> Services:
    """Services whose generator is the server at `base_url`, over the session's demo index
    and embedder (loaded once per session)."""
    settings = load_settings(db_uri=demo.settings.db_uri, generation={"max_new_tokens": 48},
                             llm={"provider": "openai", "base_url": base_url, "model": model,
                                  "api_key": KEY, "max_retries": 0, **llm})
    services = Services(settings)
    services.__dict__["embedder"] = demo.embedder
    services.__dict__["store"] = demo.store
    return services


@pytest.fixture(scope="module")
def rag_llm_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[ModelServer]:
    """`rag serve` with a token: its model `llm` is the bundled SmolLM2 without retrieval."""
    folder = tmp_path_factory.mktemp("model-server")
    env = {**clean_env(), "RAG_DB_URI": str(folder / "db"), "RAG_LLM__CACHE_DIR": str(cache_dir),
           "RAG_LLM__THREADS": "1", "RAG_SERVE__TOKEN": KEY, "HF_HUB_OFFLINE": "1"}
    proc, url = start(env, folder / "server.log")
    yield ModelServer(url + "/v1", folder / "server.log")
    stop(proc)


@pytest.fixture(scope="module")
def remote(demo_index: Services, rag_llm_server: ModelServer) -> Services:
    return remote_services(demo_index, rag_llm_server.url)


@pytest.mark.slow
def test_answer_streams_from_the_server_with_sources_and_citations(
        remote: Services, rag_llm_server: ModelServer) -> None:
    assert isinstance(remote.chat_model, RemoteChatModel)
    before = rag_llm_server.answered()
    events = list(remote.chain().stream_events(QUESTION))
    docs, pieces, final = events[0], [e for e in events if isinstance(e, str)], events[-1]
    assert isinstance(docs, list) and Path(docs[0].metadata["source"]).name == \
        "bpe-tokenization.md"
    assert isinstance(final, RagAnswer) and final.found and final.refusal is None
    assert len(pieces) >= 2 and "".join(pieces).strip() == final.answer  # streamed
    assert rag_llm_server.answered() == before + 1
    out = final.to_json()
    assert out["model"] == "llm" and out["device"] == "server"
    assert out["engine"] == f"OpenAI-compatible server at {rag_llm_server.url}"
    assert set(final.cited) | set(final.matched) <= set(range(1, len(docs) + 1))
    assert final.cited or final.matched  # free mode: the app's citations, checked
    assert final.timings["generate_ms"] > 0 and out["tokens"] == []


@pytest.mark.slow
def test_a_question_without_relevant_passages_is_refused_without_calling_the_server(
        remote: Services, rag_llm_server: ModelServer) -> None:
    before = rag_llm_server.answered()
    answer = remote.chain().answer("What is the capital of Mongolia's national football team?")
    assert (answer.answer, answer.found, answer.refusal) == (NOT_FOUND, False, NO_PASSAGE)
    assert rag_llm_server.answered() == before


@pytest.mark.slow
def test_decoding_options_reach_the_server(remote: Services) -> None:
    chain = remote.chain()
    short = chain.answer(QUESTION, max_new_tokens=3)
    assert short.metadata["finish_reason"] == "length" and len(short.answer.split()) <= 3
    greedy = chain.answer(QUESTION, max_new_tokens=24)
    sampled = [chain.answer(QUESTION, max_new_tokens=24, do_sample=True, temperature=1.5,
                            top_p=0.95, seed=7).answer for _ in range(2)]
    assert sampled[0] == sampled[1] != greedy.answer  # the seed and the temperature arrived


@pytest.mark.slow
def test_options_the_server_cannot_take_are_refused_by_name_before_any_request(
        remote: Services, rag_llm_server: ModelServer) -> None:
    before = rag_llm_server.answered()
    chain = remote.chain()
    for options, name in (({"num_beams": 2}, "generation.num_beams"),
                          ({"repetition_penalty": 1.3}, "generation.repetition_penalty"),
                          ({"do_sample": True, "top_k": 5}, "generation.top_k"),
                          ({"answer_mode": "grounded"}, "generation.answer_mode")):
        with pytest.raises(SettingsError, match=re.escape(name) + ".*llm.provider = openai"):
            chain.answer(QUESTION, **options)
    assert rag_llm_server.answered() == before


@pytest.mark.slow
def test_the_key_is_sent_and_never_shown(remote: Services, rag_llm_server: ModelServer,
                                         demo_index: Services,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = remote.chain().answer(QUESTION, max_new_tokens=4)  # the server checks it
    assert answer.found
    shown = [caplog.text, json.dumps(answer.to_json()), repr(remote.chat_model),
             repr(remote.settings), remote.settings.model_dump_json(),
             rag_llm_server.log.read_text()]
    assert not [s for s in shown if KEY in s]
    wrong = remote_services(demo_index, rag_llm_server.url, api_key="sk-wrong")
    with pytest.raises(ModelServerError, match=r"refused the key .*llm.api_key"):
        wrong.chain().answer(QUESTION)


@pytest.mark.slow
def test_rag_serve_answers_through_the_model_server(remote: Services) -> None:
    with TestClient(create_app(remote), base_url="http://127.0.0.1") as http:
        r = http.post("/v1/chat/completions", json={
            "model": "rag", "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": QUESTION}]})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    assert Path(events[0]["sources"][0]["source"]).name == "bpe-tokenization.md"
    assert len([e for e in events if e["choices"][0]["delta"].get("content")]) >= 2
    rag = events[-1]["rag"]
    assert rag["found"] and rag["model"] == "llm" and rag["engine"].startswith("OpenAI")
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_an_unreachable_model_server_is_a_clear_error_and_a_503(demo_index: Services) -> None:
    gone = remote_services(demo_index, f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ModelServerError, match=r"llm.base_url = http://127\.0\.0\.1:\d+/v1 "
                                               r"cannot be reached"):
        gone.chain().answer(QUESTION)
    with TestClient(create_app(gone), base_url="http://127.0.0.1") as http:
        r = http.post("/v1/chat/completions", json={
            "model": "rag", "messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 503 and "cannot be reached" in r.json()["error"]["message"]
        assert http.get("/health").json() == {"status": "ok"}  # still up


# -- llama-cpp-python's server (the `llamacpp` extra) --------------------------------------
def _llama_python() -> str:
    """The interpreter with llama-cpp-python[server]: LLAMA_CPP_PYTHON (one built in another
    virtualenv, README) or this one."""
    return os.environ.get("LLAMA_CPP_PYTHON") or sys.executable


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    python = _llama_python()
    found = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    if found.returncode != 0:
        pytest.skip("llama-cpp-python[server] is not installed (pip install "
                    "'rag_app[llamacpp]'; it compiles llama.cpp, README: llama.cpp's server)")
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    gguf = resolve_model_ref(BUNDLED_LLM, "llm.model")
    env = {**clean_env(), "OMP_WAIT_POLICY": "PASSIVE"}  # no spinning threads on 2 cores
    proc, url = start(env, log, [python, "-m", "llama_cpp.server", "--model", gguf,
                                 "--model_alias", "smollm2", "--n_ctx", "2048",
                                 "--n_threads", "1", "--host", "127.0.0.1", "--port"],
                      ready="/v1/models")
    yield ModelServer(url + "/v1", log)
    stop(proc)


@pytest.mark.slow
def test_llama_cpp_server_answers_with_sources_streaming_and_refusals(
        demo_index: Services, llama_server: ModelServer) -> None:
    services = remote_services(demo_index, llama_server.url, model="smollm2")
    events = list(services.chain().stream_events(QUESTION))
    final = events[-1]
    assert isinstance(final, RagAnswer) and final.found
    assert Path(final.sources[0].metadata["source"]).name == "bpe-tokenization.md"
    assert len([e for e in events if isinstance(e, str)]) >= 2
    assert set(final.cited) | set(final.matched) <= set(range(1, len(final.sources) + 1))
    short = services.chain().answer(QUESTION, max_new_tokens=3)
    assert short.metadata["finish_reason"] == "length"
    seeded = [services.chain().answer(QUESTION, max_new_tokens=16, do_sample=True,
                                      temperature=1.5, seed=3).answer for _ in range(2)]
    assert seeded[0] == seeded[1]
    refused = services.chain().answer("What is the capital of Mongolia's national team?")
    assert refused.refusal == NO_PASSAGE


@pytest.mark.slow
def test_the_ui_answers_through_the_model_server(demo_index: Services, env: pytest.MonkeyPatch,
                                                 rag_llm_server: ModelServer) -> None:
    from streamlit.testing.v1 import AppTest

    for name, value in (("PROVIDER", "openai"), ("BASE_URL", rag_llm_server.url),
                        ("MODEL", "llm"), ("API_KEY", KEY)):
        env.setenv(f"RAG_LLM__{name}", value)
    app = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "ui" / "app.py"),
                            default_timeout=600)
    app.run()
    strategy = next(r for r in app.sidebar.radio if r.label == "Strategy")
    assert list(strategy.options) == ["greedy", "sampling"]  # no beam search for a server
    before = rag_llm_server.answered()
    app.chat_input[0].set_value(QUESTION).run()
    assert not app.exception and not app.error
    assert rag_llm_server.answered() == before + 1
    assert app.session_state["messages"][-1]["answer"]["answer"]
    port = rag_llm_server.url.rsplit(":", 1)[1].split("/")[0]
    assert any("OpenAI" in c.value and port in c.value for c in app.caption)  # the server
    app.switch_page("views/lab.py").run()
    assert not app.exception and any("local model" in i.value for i in app.info)
