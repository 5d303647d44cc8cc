"""Answer quality: base or tuned model, free or grounded answers, on the public sets in
../shared/eval (never copied here) and the demo questions. Prints one Markdown table.

    .venv/bin/python benchmarks/answers.py [--limit 500] [--unanswerable-limit 99]
        [--configs base/free,base/grounded,tuned/free,tuned/grounded]

Rows are answered one question at a time and saved as they come in
`<db>/bench-answers/<config>-<set>.jsonl`, so an interrupted run resumes where it stopped
(delete the folder to start over). The evaluation collections are cached in the configured
database (RAG_DB_URI).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
DATA = Path(__file__).resolve().parents[1] / "data"
ADAPTER = "package:rag_app/adapters/smollm2-135m-rag-lora"  # the shipped default


def _settings(config: str, adapter: str) -> Any:
    from rag_app.settings import load_settings

    model, mode = config.split("/")
    return load_settings(llm={"adapter": adapter if model == "tuned" else None},
                         generation={"answer_mode": mode})


def _rows(path: Path, questions: list[dict[str, Any]], answer: Any) -> list[dict[str, Any]]:
    """Each question's row, from `path` when already answered, else answered and appended."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["id"]] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for q in questions:
            if q["_id"] not in done:
                done[q["_id"]] = answer(q)
                f.write(json.dumps(done[q["_id"]], ensure_ascii=False) + "\n")
                f.flush()
    return [done[q["_id"]] for q in questions]


def _demo(services: Any, collection: str) -> list[dict[str, Any]]:
    """The demo questions as evaluation questions (their own `answer_contains` and source)."""
    from ingest.pipeline import walk

    services.ingestor().ingest(walk([DATA]), collection)
    items = json.loads((DATA / "questions.json").read_text(encoding="utf-8"))
    return [{"_id": f"demo{i}", "text": q["question"], "contains": q["answer_contains"],
             "source": q["source"]} for i, q in enumerate(items)]


def _demo_right(row: dict[str, Any], q: dict[str, Any]) -> bool:
    """All expected strings in the answer, and the cited source is the expected document."""
    answer = row["answer"].lower()
    sources = [Path(row["sources"][n - 1]).name for n in row["cited"]]
    return all(c.lower() in answer for c in q["contains"]) and q["source"] in sources


def run_config(config: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from rag_app import metrics
    from rag_app.evaluation import answer_row, collection_name, ensure_index, load_dataset
    from rag_app.factory import Services

    services = Services(_settings(config, args.adapter))
    k, mode = services.settings.retrieval.k, services.settings.retrieval.mode
    result: dict[str, Any] = {"config": config}
    for name, limit, answerable in (("squad-dev-500", args.limit, True),
                                    ("squad-unanswerable-100", args.unanswerable_limit, False)):
        ds = load_dataset(args.eval_dir / name)
        qs = [q for q in ds.queries if bool(q.get("answers")) == answerable][:limit]
        collection = collection_name(ds.name, services)
        ensure_index(services, ds, collection)
        chain = services.chain(collection)
        rows = _rows(out_dir / f"{config.replace('/', '-')}-{name}.jsonl", qs,
                     lambda q, c=chain: answer_row(c, q, mode, k))
        result[name] = metrics.answer_metrics(rows)
    demo = _demo(services, "bench_demo")
    chain = services.chain("bench_demo")
    rows = _rows(out_dir / f"{config.replace('/', '-')}-demo.jsonl", demo,
                 lambda q: answer_row(chain, q, mode, k))
    result["demo"] = sum(_demo_right(r, q) for r, q in zip(rows, demo, strict=True))
    result["demo_n"] = len(demo)
    return result


def _f(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    import torch

    from rag_app.settings import load_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-dir", type=Path, default=EVAL)
    parser.add_argument("--limit", type=int, default=500, help="answerable SQuAD questions")
    parser.add_argument("--unanswerable-limit", type=int, default=None)
    parser.add_argument("--configs", default="base/free,base/grounded,tuned/free,tuned/grounded")
    parser.add_argument("--adapter", default=ADAPTER, help="the tuned rows' llm.adapter")
    parser.add_argument("--out", type=Path, default=None,
                        help="where answered rows are kept (default: <db>/bench-answers)")
    args = parser.parse_args()
    out_dir = args.out or Path(load_settings().db_uri) / "bench-answers"
    results = [run_config(c, args, out_dir) for c in args.configs.split(",")]

    print(f"## Answers, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| model / answers | SQuAD qs | EM | token F1 | answer contains gold | "
          "cited source contains gold | false refusals | unanswerable qs | refusal | "
          "demo right | s/question |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, u = r["squad-dev-500"], r["squad-unanswerable-100"]
        print(f"| {r['config']} | {a['questions']} | {a['exact_match']:.3f} | {a['f1']:.3f} | "
              f"{a['contains_gold']:.3f} | {a['cited_contains_gold']:.3f} | "
              f"{a['false_refusals']:.3f} | {u['unanswerable']} | {_f(u['refusal'])} | "
              f"{r['demo']}/{r['demo_n']} | {_f(a['seconds_per_question'], '.1f')} |")


if __name__ == "__main__":
    main()
