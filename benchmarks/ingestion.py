"""Ingestion throughput against the physical reference: a bare SentenceTransformer.encode
of the same chunk texts in one call. Prints a Markdown table.

    .venv/bin/python benchmarks/ingestion.py [--dataset ../shared/eval/squad-dev-500] [--limit N]

The corpus passages are written as .txt files into a temporary folder (never into the repo).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ingest.pipeline import Ingestor, walk
from rag_app.factory import Services
from rag_app.settings import load_settings

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def write_corpus(dataset: Path, folder: Path, limit: int | None) -> int:
    n = 0
    with (dataset / "corpus.jsonl").open() as f:
        for line in f:
            doc = json.loads(line)
            (folder / f"{doc['_id']}.txt").write_text(f"{doc['title']}\n\n{doc['text']}")
            n += 1
            if limit and n >= limit:
                break
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=EVAL / "squad-dev-500")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, db = Path(tmp) / "corpus", Path(tmp) / "db"
        corpus.mkdir()
        files = write_corpus(args.dataset, corpus, args.limit)
        settings = load_settings(db_uri=str(db))
        services = Services(settings)
        ingestor = Ingestor(services.embedder, services.store, settings.chunking,
                            settings.ingestion)
        started = time.perf_counter()
        report = ingestor.ingest(walk([corpus]), "bench")
        first_s = time.perf_counter() - started
        chunks = report.to_json()["chunks"]

        table = services.store.db.open_table("bench").to_arrow()
        texts = [f"{t}\n{x}" if h == t else f"{h}\n{x}" for t, h, x in zip(
            table["title"].to_pylist(), table["heading"].to_pylist(),
            table["text"].to_pylist(), strict=True)]
        started = time.perf_counter()
        services.embedder.model.encode(texts, batch_size=settings.embedding.batch_size,
                                       normalize_embeddings=True)
        bare_s = time.perf_counter() - started

        started = time.perf_counter()
        again = ingestor.ingest(walk([corpus]), "bench").to_json()
        rerun_s = time.perf_counter() - started
    assert again["unchanged"] == files
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"{files} files, {chunks} chunks, embedder batch {settings.embedding.batch_size}")
    print("| measure | value |\n|---|---|")
    print(f"| end-to-end ingest | {first_s:.1f} s, {chunks / first_s:.1f} chunks/s |")
    print(f"| bare encode, same texts | {bare_s:.1f} s, {chunks / bare_s:.1f} chunks/s |")
    print(f"| end-to-end / bare (goal >= 0.85) | {bare_s / first_s:.2f} |")
    print(f"| unchanged re-ingest | {rerun_s:.2f} s = {100 * rerun_s / first_s:.1f} % of first "
          "(goal <= 3 %) |")


if __name__ == "__main__":
    main()
