"""Decoder speed on a RAG-shaped prompt (about 1,500 tokens of sources + a question,
128 new greedy tokens): load time (cold GGUF conversion and cached), time to first token and
decode tokens/s for the fast CPU decoder (the default on CPU; with its native kernels
and with PyTorch operations), for transformers' `generate`
(fp32, bf16), each on 1 and all threads, and, in the same run, for llama.cpp on the same
GGUF file when `llama-cpp-python` is installed (see the README for
the build flags this machine's compiler needs). Prints a Markdown table.

    .venv/bin/python benchmarks/generation.py [--runs 3] [--new-tokens 128]
    .venv/bin/python benchmarks/generation.py --beams 4 [--new-tokens 64]   # beam search only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import torch

from rag_app.llm import LocalLM
from rag_app.locate import resolve_model_ref
from rag_app.settings import BUNDLED_LLM, load_settings

DATA = Path(__file__).resolve().parent.parent / "data"


def rag_messages(lm: LocalLM, target_tokens: int = 1500) -> list[dict[str, str]]:
    """Numbered demo passages until the prompt holds about `target_tokens` tokens."""
    texts = [" ".join(p.read_text().split()) for p in sorted(DATA.glob("*.md"))]
    sources: list[str] = []
    messages: list[dict[str, str]] = []
    while not messages or lm.count_chat_tokens(messages) < target_tokens:
        sources.append(f"[{len(sources) + 1}] {texts[len(sources) % len(texts)]}")
        messages = [{"role": "system", "content": "Answer only from the sources; cite [n]."},
                    {"role": "user", "content": "Sources:\n" + "\n\n".join(sources)
                     + "\n\nQuestion: How does byte-pair encoding build its vocabulary?"}]
    return messages


def bench_lm(lm: LocalLM, messages: list, new_tokens: int, runs: int) -> tuple[float, float]:
    options = load_settings().generation.model_copy(update={"max_new_tokens": new_tokens})
    gens = [lm.generate(messages, options) for _ in range(runs)]
    return (statistics.median(g.first_token_s for g in gens) * 1000,
            statistics.median(g.tokens_per_s for g in gens))


def bench_llama_cpp(gguf: str, prompt_text: str, new_tokens: int, runs: int, threads: int
                    ) -> tuple[float, float, float] | None:
    # Idle OpenMP threads must sleep, not spin: spinning threads starve decoding whenever
    # anything else runs on a 2-core machine (1-10 tok/s instead of 40-75 measured here).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    started = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load_s = time.perf_counter() - started
    firsts, rates = [], []
    for _ in range(runs):
        llm.reset()
        started = time.perf_counter()
        first, count = None, 0
        for _chunk in llm(prompt_text, max_tokens=new_tokens, temperature=0.0, stream=True):
            count += 1
            if first is None:
                first = time.perf_counter() - started
        total = time.perf_counter() - started
        firsts.append((first or total) * 1000)
        rates.append((count - 1) / (total - (first or total)) if count > 1 else 0.0)
    return load_s, statistics.median(firsts), statistics.median(rates)


def bench_beams(beams: int, new_tokens: int, runs: int) -> None:
    """Beam search on the same prompt: the fast decoder's own loop against `generate`."""
    settings = load_settings()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; {beams} beams, "
          f"{new_tokens} new tokens, median of {runs}")
    print("| backend | total s |")
    print("|---|---|")
    for name, update in (("fast decoder", {"engine": "fast"}),
                         ("transformers float32", {"engine": "transformers",
                                                   "dtype": "float32"})):
        lm = LocalLM(settings.llm.model_copy(update=update))
        options = settings.generation.model_copy(update={"max_new_tokens": new_tokens,
                                                         "num_beams": beams})
        messages = rag_messages(lm)
        total = statistics.median(lm.generate(messages, options).total_s for _ in range(runs))
        print(f"| {name} | {total:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="default 128 (64 with --beams)")
    parser.add_argument("--beams", type=int, default=0, help="time beam search instead")
    args = parser.parse_args()
    if args.beams:
        bench_beams(args.beams, args.new_tokens or 64, args.runs)
        return
    args.new_tokens = args.new_tokens or 128
    settings = load_settings()
    threads_all = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        LocalLM(settings.llm.model_copy(update={"cache_dir": Path(cache)}))
        cold_s = time.perf_counter() - started
        variants = [("fast decoder, int4 + bfloat16, native step (default)",
                     {"engine": "fast"}),
                    ("fast decoder, PyTorch operations", {"engine": "fast",
                                                         "kernels": "torch"}),
                    ("transformers float32", {"engine": "transformers", "dtype": "float32"}),
                    ("transformers bfloat16", {"engine": "transformers", "dtype": "bfloat16"})]
        for name, update in variants:
            started = time.perf_counter()
            lm = LocalLM(settings.llm.model_copy(update={"cache_dir": Path(cache), **update}))
            load_s = time.perf_counter() - started
            messages = rag_messages(lm)
            for threads in sorted({1, threads_all}):
                torch.set_num_threads(threads)
                first_ms, rate = bench_lm(lm, messages, args.new_tokens, args.runs)
                rows.append((name, threads, load_s, first_ms, rate))
                print(rows[-1], file=sys.stderr, flush=True)
        torch.set_num_threads(threads_all)
        prompt_tokens = lm.count_chat_tokens(messages)
        prompt_text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=False)
    notes = []
    if settings.llm.model == BUNDLED_LLM:
        gguf = resolve_model_ref(BUNDLED_LLM, "llm.model")
        for threads in sorted({1, threads_all}):
            # A child process: a native crash in llama.cpp must not lose the other rows.
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                try:
                    res = pool.submit(bench_llama_cpp, gguf, prompt_text, args.new_tokens,
                                      args.runs, threads).result()
                except BrokenProcessPool:
                    notes.append(f"llama.cpp ({threads} threads) crashed in this build")
                    continue
            if res is None:
                notes.append("llama.cpp not installed (pip install 'rag_app[bench]')")
                break
            rows.append(("llama.cpp (same GGUF)", threads, *res))
    print(f"machine: {platform.machine()}, {threads_all} threads, torch {torch.__version__}; "
          f"prompt {prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"median of {args.runs}; cold start (GGUF conversion, kernel build, load): "
          f"{cold_s:.1f} s")
    print("| backend | threads | load s | first token ms | decode tok/s |")
    print("|---|---|---|---|---|")
    for name, threads, load_s, first_ms, rate in rows:
        print(f"| {name} | {threads} | {load_s:.1f} | {first_ms:.0f} | {rate:.1f} |")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
