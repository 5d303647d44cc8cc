"""Several users at once: N concurrent askers on one process (as the Streamlit app serves its
sessions: one embedder, one LLM, generations taking turns) while an ingest writes to the same
collection. Prints latency percentiles per N and checks that nothing failed, got lost or
was duplicated.

    .venv/bin/python benchmarks/load.py [--askers 1 4 16] [--questions 2] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ingest.pipeline import Ingestor, SourceFile, walk
from rag_app.chain import RagAnswer, Waiting
from rag_app.factory import Services
from rag_app.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "eval"


def passages(n: int) -> list[SourceFile]:
    out = []
    with (EVAL / "squad-dev-500" / "corpus.jsonl").open() as f:
        for line in f:
            doc = json.loads(line)
            text = f"# {doc['title']}\n\n{doc['text']}".encode()
            out.append(SourceFile(f"upload/{doc['_id']}.md", lambda t=text: t))
            if len(out) == n:
                break
    return out


def run(services: Services, askers: int, questions: list[str], per_asker: int,
        options: dict, extra: list[SourceFile]) -> dict:
    ingestor = Ingestor(services.embedder, services.store, services.settings.chunking)
    ingestor.ingest(walk([ROOT / "data"]), "default")

    def ask(i: int) -> list[dict]:
        out = []
        for j in range(per_asker):
            started, waited = time.perf_counter(), 0
            final = None
            for event in services.chain().stream_events(
                    questions[(i * per_asker + j) % len(questions)], **options):
                waited += isinstance(event, Waiting)
                final = event
            assert isinstance(final, RagAnswer) and final.answer
            out.append({"total_ms": (time.perf_counter() - started) * 1000, **final.timings})
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(askers + 1) as pool:
        ingest = pool.submit(ingestor.ingest, extra, "default")
        results = [r for rs in pool.map(ask, range(askers)) for r in rs]
        report = ingest.result()
    wall = time.perf_counter() - started
    assert not report.failed
    docs = {d["source"]: d["chunks"] for d in services.store.documents("default")}
    ids = services.store.db.open_table("default").to_arrow()["id"].to_pylist()
    intact = len(docs) == 8 + len(extra) and len(ids) == len(set(ids)) == sum(docs.values())
    col = {k: np.array([r[k] for r in results]) for k in results[0]}
    return {"askers": askers, "answers": len(results), "wall_s": wall,
            "total": np.percentile(col["total_ms"], [50, 95]),
            "retrieve": np.percentile(col["retrieve_ms"], [50, 95]),
            "queue": np.percentile(col["queue_ms"], [50, 95]),
            "first": np.percentile(col["first_token_ms"], [50, 95]),
            "intact": intact}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--askers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--questions", type=int, default=2, help="questions per asker")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ingest-docs", type=int, default=200)
    args = parser.parse_args()
    questions = [q["question"] for q in json.loads((ROOT / "data" / "questions.json").read_text())]
    extra = passages(args.ingest_docs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Services(load_settings(db_uri=str(Path(tmp) / "warm")))
        base.lm  # load once; every run shares it, as the app's sessions do  # noqa: B018
        for n in args.askers:
            uri = str(Path(tmp) / f"n{n}")
            services = Services(base.settings.model_copy(update={"db_uri": uri}))
            services.__dict__["embedder"], services.__dict__["lm"] = base.embedder, base.lm
            rows.append(run(services, n, questions, args.questions,
                            {"max_new_tokens": args.max_new_tokens}, extra))
            print(f"... {n} askers done", flush=True)
    print(f"\n{platform.machine()}, {args.questions} questions per asker, "
          f"{args.max_new_tokens} new tokens, an ingest of {args.ingest_docs} documents "
          "running meanwhile\n")
    print("| askers | answers | wall s | answer p50 / p95 s | retrieval p50 / p95 ms | "
          "queued p50 / p95 s | first token p50 ms | documents intact |")
    print("|---:|---:|---:|---|---|---|---:|---|")
    for r in rows:
        print(f"| {r['askers']} | {r['answers']} | {r['wall_s']:.0f} | "
              f"{r['total'][0] / 1000:.1f} / {r['total'][1] / 1000:.1f} | "
              f"{r['retrieve'][0]:.0f} / {r['retrieve'][1]:.0f} | "
              f"{r['queue'][0] / 1000:.1f} / {r['queue'][1] / 1000:.1f} | "
              f"{r['first'][0]:.0f} | {'yes' if r['intact'] else 'NO'} |")


if __name__ == "__main__":
    main()
