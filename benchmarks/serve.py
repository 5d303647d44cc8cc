"""What a running `rag serve` saves: `rag ask` cold (a new process loads the embedder and
the LLM for every question) against the same question asked of a server that holds them.
Prints one Markdown table.

    .venv/bin/python benchmarks/serve.py [--runs 2] [--max-new-tokens 64]

Uses a temporary database holding data/ and the usual model cache (llm.cache_dir), so the
GGUF conversion is not part of a cold start once it has been done. Wall-clock times; the
median of --runs runs, each with the next question of data/questions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from rag_app import child_server
from rag_app.errors import ModelServerError

ROOT = Path(__file__).resolve().parents[1]
RAG = [sys.executable, "-m", "rag_app.cli"]


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _run(env: dict[str, str], *args: str) -> str:
    r = subprocess.run([*RAG, *args], env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"rag {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def _first_token_s(url: str, question: str) -> float:
    """Seconds to the first answer text of a streamed chat completion."""
    body = {"model": "rag", "stream": True, "messages": [{"role": "user", "content": question}]}
    started = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                return time.perf_counter() - started
    raise RuntimeError("no answer text in the stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    questions = [q["question"] for q in json.loads((ROOT / "data" / "questions.json")
                                                   .read_text(encoding="utf-8"))]
    ask = lambda i: questions[i % len(questions)]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAG_")},
               "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAG_DB_URI": f"{tmp}/db",
               "RAG_GENERATION__MAX_NEW_TOKENS": str(args.max_new_tokens)}
        _run(env, "ingest", str(ROOT / "data"))
        rows: dict[str, list[float]] = {}
        rows["`rag ask` (new process: loads the embedder and the LLM)"] = [
            _timed(lambda i=i: _run(env, "ask", ask(i), "--json")) for i in range(args.runs)]
        try:
            proc, url = child_server.start([*RAG, "serve", "--port"], env,
                                           Path(tmp) / "server.log", timeout_s=600)
        except ModelServerError as e:
            sys.exit(str(e))
        try:
            timings: list[dict[str, float]] = []

            def chat(q: str) -> None:
                r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
                    "model": "rag", "messages": [{"role": "user", "content": q}]})
                timings.append(r.raise_for_status().json()["rag"]["timings"])

            rows["server, first question (loads the models)"] = [_timed(lambda: chat(ask(0)))]
            rows["server, chat completion (models loaded)"] = [
                _timed(lambda i=i: chat(ask(i + 1))) for i in range(args.runs)]
            rows["server, streamed: first answer text"] = [
                _first_token_s(url, ask(i + 1)) for i in range(args.runs)]
            remote = {**env, "RAG_SERVE__URL": url}
            rows["`rag ask` with serve.url (new process, the server's models)"] = [
                _timed(lambda i=i: _run(remote, "ask", ask(i + 1), "--json"))
                for i in range(args.runs)]
        finally:
            child_server.stop(proc)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"max_new_tokens={args.max_new_tokens}, median of {args.runs} runs\n")
    print("| path | seconds |\n|---|---:|")
    for name, times in rows.items():
        print(f"| {name} | {statistics.median(times):.1f} |")
    warm = timings[1:]  # the server's own account of the warm chat completions
    print("\nInside the warm chat completions (median ms): " + ", ".join(
        f"{k} {statistics.median(t[k] for t in warm):.0f}"
        for k in ("retrieve_ms", "first_token_ms", "generate_ms", "total_ms")))


if __name__ == "__main__":
    main()
