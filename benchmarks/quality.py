"""Retrieval and answer quality on the public evaluation sets in ../shared/eval (never copied
into this repository): SciFact (all 5,183 abstracts, 300 claims) and SQuAD dev (500
questions), every search mode and both hybrid fusions, answers for one mode on a few
questions. Prints Markdown tables.

    .venv/bin/python benchmarks/quality.py [--limit 200] [--answer-limit 30]

The evaluation collections are cached in the configured database (RAG_DB_URI), so only the
first run pays for embedding the corpora.
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def _f(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    from rag_app.evaluation import MODES, run_eval
    from rag_app.factory import Services
    from rag_app.settings import load_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-dir", type=Path, default=EVAL)
    parser.add_argument("--scifact-limit", type=int, default=None,
                        help="SciFact queries (default: all 300)")
    parser.add_argument("--limit", type=int, default=None,
                        help="SQuAD questions for retrieval (default: all 500)")
    parser.add_argument("--answer-limit", type=int, default=30, help="SQuAD questions answered")
    parser.add_argument("--answer-mode", default="hybrid", choices=MODES)
    args = parser.parse_args()

    settings = load_settings()
    services = Services(settings)
    sets = [("scifact", args.eval_dir / "scifact", args.scifact_limit),
            ("squad-dev-500", args.eval_dir / "squad-dev-500", args.limit)]

    retrieval: list[dict[str, Any]] = []
    for _, path, limit in sets:
        for mode in MODES:
            out = run_eval(services, path, limit, mode, settings.retrieval.k, answer=False)
            retrieval.append({**out, "mode": f"hybrid ({settings.retrieval.fusion})"
                              if mode == "hybrid" else mode})
        out = run_eval(services, path, limit, "hybrid", settings.retrieval.k, answer=False,
                       fusion="rrf")
        retrieval.append({**out, "mode": "hybrid (rrf)"})
    answers = run_eval(services, sets[1][1], args.answer_limit, args.answer_mode,
                       settings.retrieval.k, answer=True)

    print(f"## Quality, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, {platform.system()} "
          f"{platform.release()}, torch {torch.__version__}  ")
    print(f"embedder `{settings.embedding.model}`, chunks {settings.chunking.size_tokens} "
          f"tokens (overlap {settings.chunking.overlap_tokens}); LLM `{settings.llm.model}`, "
          f"max {settings.generation.max_new_tokens} new tokens, "
          f"{'sampling' if settings.generation.do_sample else 'greedy'}\n")

    print("### Retrieval (passage level: a passage ranks at its best chunk)\n")
    print("| set | mode | queries | nDCG@10 | Recall@1 | Recall@5 | Recall@10 | MRR@10 "
          "| ms/query (p50) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for out in retrieval:
        r = out["retrieval"]
        print(f"| {out['dataset']} | {out['mode']} | {out['queries']} | {r['ndcg@10']:.3f} | "
              f"{r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | "
              f"{r['mrr@10']:.3f} | {out['timings']['retrieval_ms_p50']:.0f} |")

    print("\n### Indexing (first run; later runs reuse the collection)\n")
    print("| set | passages | collection | ingest s |")
    print("|---|---|---|---|")
    for out in retrieval[::len(MODES) + 1]:
        t = out["timings"]
        print(f"| {out['dataset']} | {out['passages']} | {out['collection']} | "
              f"{'cached' if t['ingest_cached'] else format(t['ingest_s'], '.0f')} |")

    a, t = answers["answers"], answers["timings"]
    print("\n### Answers (SQuAD normalisation; cited = share of answered questions whose "
          "cited sources contain a gold answer)\n")
    print("| set | mode | k | questions | exact match | token F1 | cited contains gold "
          "| cited or matched contains gold | not found | s/question (mean) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if a is not None:
        print(f"| {answers['dataset']} | {answers['mode']} | {answers['k']} | "
              f"{a['questions']} | {a['exact_match']:.3f} | {a['f1']:.3f} | "
              f"{a['cited_contains_gold']:.3f} ({a['answered']} answered) | "
              f"{a['supported_contains_gold']:.3f} | "
              f"{a['not_found']:.3f} | {_f(t['answer_s_mean'], '.1f')} |")


if __name__ == "__main__":
    main()
