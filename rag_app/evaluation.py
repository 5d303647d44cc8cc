"""`rag eval`: retrieval and answer quality on a BEIR-style folder.

The corpus is ingested with the project's own pipeline (loader, chunking, embedder, LanceDB)
into a collection of the configured database named after the dataset and the embedding and
chunking settings, so later runs reuse it. Rankings are scored at the passage level: a
passage's rank is that of its best chunk.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag_app import metrics
from rag_app.errors import RagError, SettingsError
from rag_app.factory import Services

MODES = ("vector", "fulltext", "hybrid")
RETRIEVE_CHUNKS = 50  # chunks fetched per query (the retriever's maximum k); >= 10 passages
SUFFIX = ".txt"  # passages are ingested as text files named `<corpus id>.txt`


class DatasetError(RagError):
    """The evaluation folder is missing files or holds malformed lines."""


@dataclass
class Dataset:
    name: str
    corpus: dict[str, tuple[str, str]]  # id -> (title, text)
    queries: list[dict[str, Any]]  # in file order
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)  # query id -> {id: score}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    return rows


def dataset_name(dataset_dir: Path) -> str:
    """Folder name, prefixed by its parent's when the parent is a dataset too
    (`scifact/subset_1k` -> `scifact_subset_1k`)."""
    d = Path(dataset_dir).resolve()
    name = f"{d.parent.name}_{d.name}" if (d.parent / "corpus.jsonl").is_file() else d.name
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def load_dataset(dataset_dir: Path) -> Dataset:
    d = Path(dataset_dir)
    if not d.is_dir():
        raise DatasetError(f"no such dataset folder: {d}")
    missing = [p for p in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")
               if not (d / p).is_file()]
    if missing:
        raise DatasetError(f"{d} is not a BEIR folder: missing {', '.join(missing)}")
    corpus = {}
    for row in _jsonl(d / "corpus.jsonl"):
        if "_id" not in row:
            raise DatasetError(f"{d / 'corpus.jsonl'}: a line has no _id")
        corpus[str(row["_id"])] = (row.get("title") or "", row.get("text") or "")
    queries = _jsonl(d / "queries.jsonl")
    qrels: dict[str, dict[str, int]] = {}
    with (d / "qrels" / "test.tsv").open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if n == 1 and not parts[-1].strip().lstrip("-").isdigit():
                continue  # header
            if len(parts) < 3 or not parts[2].strip().lstrip("-").isdigit():
                if line.strip():
                    raise DatasetError(f"{d / 'qrels/test.tsv'}:{n}: expected "
                                       "query-id<TAB>corpus-id<TAB>score")
                continue
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return Dataset(dataset_name(d), corpus, queries, qrels)


def collection_name(dataset: str, services: Services) -> str:
    """`eval_<dataset>_<hash8>`; the hash covers what the stored chunks depend on."""
    s = services.settings
    key = f"{s.embedding.model}|{s.chunking.size_tokens}|{s.chunking.overlap_tokens}"
    return f"eval_{dataset}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def passage_text(title: str, text: str) -> str:
    return f"{title}\n\n{text}" if title.strip() else text


def ensure_index(services: Services, ds: Dataset, collection: str,
                 progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Ingest the corpus unless the collection already holds every passage as it is now:
    a passage whose text changed (a rebuilt set) is ingested again, one no longer in the
    corpus is removed, so a cached collection never scores a stale corpus."""
    from ingest.pipeline import SourceFile

    texts = {pid: passage_text(t, x).encode("utf-8") for pid, (t, x) in ds.corpus.items()
             if passage_text(t, x).strip()}
    wanted = {f"{pid}{SUFFIX}": hashlib.sha256(b).hexdigest() for pid, b in texts.items()}
    stored = services.store.document_hashes(collection)
    if wanted.items() <= stored.items() and stored.keys() <= wanted.keys():
        return {"cached": True, "ingest_s": 0.0, "failed": 0}
    started = time.perf_counter()
    services.store.delete_documents(collection, stored.keys() - wanted.keys())
    files = [SourceFile(f"{pid}{SUFFIX}", lambda b=b: b) for pid, b in texts.items()]
    report = services.ingestor().ingest(files, collection, progress)  # indexes refreshed too
    return {"cached": False, "ingest_s": time.perf_counter() - started,
            "failed": len(report.failed)}


def run_eval(services: Services, dataset_dir: Path, limit: int | None, mode: str, k: int,
             answer: bool, progress: Callable[[Any], None] | None = None,
             fusion: str | None = None) -> dict[str, Any]:
    """Retrieval metrics (and, for QA sets with `answer`, answer metrics) as a JSON-able dict.

    Only queries with a relevant qrel are evaluated, the first `limit` in file order;
    `fusion` overrides retrieval.fusion for hybrid.
    """
    if mode not in MODES:
        raise SettingsError(f"invalid setting retrieval.mode (RAG_RETRIEVAL__MODE): {mode!r} "
                            f"is not one of {', '.join(MODES)}")
    ds = load_dataset(dataset_dir)
    queries = [q for q in ds.queries if metrics.relevant(ds.qrels.get(str(q.get("_id")), {}))]
    queries = queries[:limit] if limit is not None else queries
    # questions the corpus cannot answer: scored by refusals, not by retrieval
    refusable = [q for q in ds.queries if q.get("answerable") is False]
    refusable = refusable[:limit] if limit is not None else refusable
    if not queries and not (answer and refusable):
        raise DatasetError(f"{dataset_dir}: no query has a relevant passage in qrels/test.tsv"
                           + ("" if answer or not refusable else
                              " (its unanswerable questions are scored with --answers)"))
    collection = collection_name(ds.name, services)
    index = ensure_index(services, ds, collection, progress)

    retriever = services.retriever(collection)
    runs, retrieve_ms = [], []
    for q in queries:
        started = time.perf_counter()
        docs = retriever.invoke(q["text"], k=RETRIEVE_CHUNKS, mode=mode, min_similarity=-1.0,
                                fusion=fusion)
        retrieve_ms.append((time.perf_counter() - started) * 1000)
        ranking = metrics.collapse_to_passages(
            str(d.metadata["source"]).removesuffix(SUFFIX) for d in docs)
        runs.append((ranking, ds.qrels[str(q["_id"])]))
    ranks = {str(q["_id"]): metrics.first_rank(r, qrels, 10)
             for q, (r, qrels) in zip(queries, runs, strict=True)}

    answers, answer_s, details = None, [], []
    qa = [q for q in queries if q.get("answers")] + refusable
    if answer and qa:
        details = _answer_all(services.chain(collection), qa, mode, k)
        answer_s = [d["seconds"] for d in details]
        answers = metrics.answer_metrics(details)

    return {
        "dataset": ds.name, "collection": collection, "mode": mode, "k": k,
        "passages": len(ds.corpus), "queries": len(queries),
        "retrieval": metrics.retrieval_metrics(runs) if runs else None,
        "ranks": ranks,  # query id -> rank of its first relevant passage (None: not in 10)
        "answers": answers,
        "timings": {
            "ingest_s": index["ingest_s"], "ingest_cached": index["cached"],
            "retrieval_ms_p50": statistics.median(retrieve_ms) if retrieve_ms else None,
            "retrieval_ms_mean": statistics.fmean(retrieve_ms) if retrieve_ms else None,
            "answer_s_mean": statistics.fmean(answer_s) if answer_s else None,
            "answer_s_p50": statistics.median(answer_s) if answer_s else None,
        },
        "ingest_failed": index["failed"],
        "details": details,
    }


def _answer_all(chain: Any, qa: list[dict[str, Any]], mode: str, k: int
                ) -> list[dict[str, Any]]:
    return [answer_row(chain, q, mode, k) for q in qa]


def answer_row(chain: Any, q: dict[str, Any], mode: str, k: int) -> dict[str, Any]:
    """Answer one question; its result row, as `metrics.answer_metrics` reads it."""
    from rag_app.prompt import NOT_FOUND

    started = time.perf_counter()
    out = chain.answer(q["text"], mode=mode, k=k)
    return {
        "id": q.get("_id"), "question": q["text"], "answer": out.answer,
        "golds": list(q.get("answers") or []),
        "not_found": metrics.is_not_found(out.answer, out.found, NOT_FOUND),
        "refusal": out.refusal, "confidence": out.confidence,
        "similarity": max((d.metadata.get("similarity") or 0.0 for d in out.sources),
                          default=None),
        "sources": [str(d.metadata.get("source")) for d in out.sources],
        "cited": out.cited,
        "cited_texts": [out.sources[n - 1].page_content for n in out.cited],
        "matched_texts": [out.sources[n - 1].page_content for n in out.matched],
        "seconds": time.perf_counter() - started,
    }
