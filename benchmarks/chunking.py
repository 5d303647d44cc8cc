"""Chunk size and overlap by measurement: retrieval quality on the eval sets for a few
settings (each ingested once into the configured database and cached). Prints a table.

    RAG_DB_URI=/tmp/evaldb .venv/bin/python benchmarks/chunking.py [--sets scifact/subset_1k]
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

from rag_app.evaluation import run_eval
from rag_app.factory import Services
from rag_app.settings import load_settings

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
GRID = [(128, 16), (128, 32), (200, 32), (224, 32), (224, 64)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=["scifact/subset_1k"])
    parser.add_argument("--modes", nargs="+", default=["vector", "hybrid"])
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    base = load_settings()
    embedder = Services(base).embedder
    print(f"{datetime.date.today()}, {platform.machine()}; embedder {base.embedding.model}")
    print("| set | size | overlap | mode | nDCG@10 | Recall@5 | MRR@10 |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets:
        for size, overlap in GRID:
            settings = base.model_copy(update={"chunking": base.chunking.model_copy(
                update={"size_tokens": size, "overlap_tokens": overlap})})
            services = Services(settings)
            services.__dict__["embedder"] = embedder  # one model for the whole grid
            for mode in args.modes:
                r = run_eval(services, EVAL / name, args.limit, mode, base.retrieval.k, False)
                m = r["retrieval"]
                print(f"| {name} | {size} | {overlap} | {mode} | {m['ndcg@10']:.3f} | "
                      f"{m['recall@5']:.3f} | {m['mrr@10']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
