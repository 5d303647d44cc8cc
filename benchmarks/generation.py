"""Decoder speed of the configured LLM on a RAG-sized prompt: time to first token and
decode tokens/s, per dtype and CPU thread count. Prints a Markdown table.

    .venv/bin/python benchmarks/generation.py [--runs 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch

from rag_app.llm import Generation, LocalLM
from rag_app.settings import load_settings

DATA = Path(__file__).resolve().parent.parent / "data"


def rag_prompt(words: int = 1000) -> list[dict[str, str]]:
    text = " ".join(" ".join(p.read_text().split()) for p in sorted(DATA.glob("*.md")))
    context = " ".join(text.split()[:words])
    return [{"role": "system", "content": "Answer only from the sources and cite [n]."},
            {"role": "user", "content": f"Sources:\n[1] {context}\n\nQuestion: What is BPE?"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    settings = load_settings()
    messages = rag_prompt()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads available, torch {torch.__version__}")
    print("| dtype | threads | prompt tokens | first token ms (median) | decode tok/s (median) |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        lm = LocalLM(settings.llm.model_copy(update={"dtype": dtype}))
        options = settings.generation.model_copy(update={"max_new_tokens": args.new_tokens})
        for threads in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(threads)
            runs: list[Generation] = [lm.generate(messages, options) for _ in range(args.runs)]
            print(f"| {dtype} | {threads} | {runs[0].prompt_tokens} | "
                  f"{statistics.median(r.first_token_s for r in runs) * 1000:.0f} | "
                  f"{statistics.median(r.tokens_per_s for r in runs):.1f} |")


if __name__ == "__main__":
    main()
