"""Hybrid fusion variants compared offline on evaluation sets already indexed by `rag eval`
(or benchmarks/realdocs.py, benchmarks/quality.py): each query's vector and BM25 candidates
are fetched once, then every variant fuses them the way `rag_app.fusion` would.

    python benchmarks/fusion_sweep.py .rag/realdocs ../shared/eval/squad-dev-500 \
        ../shared/eval/scifact/subset_1k

Prints hit@1, hit@4 and nDCG@10 (passage level) per set and variant, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rag_app import metrics

# "keyword query": the BM25 side reads the question without its frame words (why, how,
# does, I), which LanceDB's English stop-word list keeps. Measured worse (README), so the
# product does not do it; kept here to rerun.
# Interrogatives, auxiliaries and pronouns: the frame of a question, never its topic.
QUESTION_WORDS = frozenset([
    "why", "how", "what", "which", "who", "whom", "whose", "when", "where", "whether",
    "do", "does", "did", "doing", "done", "can", "could", "should", "would", "may",
    "might", "must", "shall", "i", "me", "my", "mine", "we", "us", "our", "you", "your",
    "yours", "he", "she", "his", "her", "they", "them", "am", "is", "are", "was", "were",
    "been", "being", "has", "have", "had",
])
_EDGE = re.compile(r"^[^\w\\-]+|[^\w]+$")


def keyword_query(question: str) -> str:
    """`question` without its frame words; the question itself if nothing else is left.
    Identifiers stay verbatim (`\\UseRawInputEncoding`, `--autosquash`, `list.sort()`)."""
    kept = [w for w in question.split() if _EDGE.sub("", w).lower() not in QUESTION_WORDS]
    return " ".join(kept) if kept else question


CANDIDATES = 200  # per side, as `rag eval` fetches them (4 x its 50 chunks)
Side = dict[str, tuple[float, str]]  # chunk id -> (score, passage id)


def _z(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    a = np.asarray(list(scores.values()))
    sd = a.std()
    return {k: float((v - a.mean()) / sd) if sd > 0 else 0.0 for k, v in scores.items()}


def zscore(w: float) -> Callable[[Side, Side], list[str]]:
    def fuse(v: Side, f: Side) -> list[str]:
        vz, fz = _z({k: s for k, (s, _) in v.items()}), _z({k: s for k, (s, _) in f.items()})
        vfloor, ffloor = min(vz.values(), default=0.0), min(fz.values(), default=0.0)
        ids = set(v) | set(f)
        return sorted(ids, key=lambda i: -(w * vz.get(i, vfloor) + (1 - w) * fz.get(i, ffloor)))
    return fuse


def zmax(w: float) -> Callable[[Side, Side], list[str]]:
    """z-score fusion, but a chunk scores at least its stronger side's z-score times the
    larger weight: a keyword hit far above the rest is not averaged away."""
    def fuse(v: Side, f: Side) -> list[str]:
        vz, fz = _z({k: s for k, (s, _) in v.items()}), _z({k: s for k, (s, _) in f.items()})
        vfloor, ffloor = min(vz.values(), default=0.0), min(fz.values(), default=0.0)

        def score(i: str) -> float:
            a, b = vz.get(i, vfloor), fz.get(i, ffloor)
            return max(w * a + (1 - w) * b, max(w, 1 - w) * max(a, b))
        return sorted(set(v) | set(f), key=lambda i: -score(i))
    return fuse


def rrf(k: int = 60) -> Callable[[Side, Side], list[str]]:
    def fuse(v: Side, f: Side) -> list[str]:
        score: dict[str, float] = {}
        for side in (v, f):
            for r, i in enumerate(sorted(side, key=lambda i: -side[i][0])):
                score[i] = score.get(i, 0.0) + 1 / (k + r + 1)
        return sorted(score, key=lambda i: -score[i])
    return fuse


def candidates(table, store, query: str, vector: list[float]) -> tuple[Side, Side]:
    vec = store._vector_query(table, vector, None).limit(CANDIDATES).to_arrow().to_pylist()
    v = {r["id"]: (1.0 - r["_distance"], r["source"]) for r in vec}
    f: Side = {}
    if query.strip():
        fts = store._text_query(table, query, None).limit(CANDIDATES).to_arrow().to_pylist()
        f = {r["id"]: (r["_score"], r["source"]) for r in fts}
    return v, f


def main() -> None:
    import torch

    from rag_app.evaluation import SUFFIX, collection_name, load_dataset
    from rag_app.factory import Services
    from rag_app.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("RAG_BENCH_THREADS", "1")))
    services = Services(load_settings())
    variants: dict[str, tuple[Callable[[Side, Side], list[str]], bool]] = {
        "rrf": (rrf(), False),
        **{f"zscore {w}": (zscore(w), False) for w in (0.3, 0.4, 0.5, 0.6)},
        **{f"zscore {w}, keyword query": (zscore(w), True) for w in (0.4, 0.5, 0.6)},
        "rrf, keyword query": (rrf(), True),
        "zmax 0.5": (zmax(0.5), False),
        "zmax 0.5, keyword query": (zmax(0.5), True),
    }
    print("| set | variant | hit@1 | hit@4 | nDCG@10 |\n|---|---|---|---|---|")
    for path in args.sets:
        ds = load_dataset(path)
        table = services.store.db.open_table(collection_name(ds.name, services))
        queries = [q for q in ds.queries if metrics.relevant(ds.qrels.get(str(q["_id"]), {}))]
        runs: dict[str, list] = {name: [] for name in variants}
        for q in queries:
            vector = services.embedder.embed_query(q["text"])
            plain = candidates(table, services.store, q["text"], vector)
            keyword = candidates(table, services.store, keyword_query(q["text"]), vector)
            for name, (fuse, kw) in variants.items():
                v, f = keyword if kw else plain
                source = {i: s for side in (v, f) for i, (_, s) in side.items()}
                ranking = metrics.collapse_to_passages(
                    source[i].removesuffix(SUFFIX) for i in fuse(v, f)[:50])
                runs[name].append((ranking, ds.qrels[str(q["_id"])]))
        for name, rs in runs.items():
            m = metrics.retrieval_metrics(rs)
            print(f"| {ds.name} | {name} | {m['hit@1']:.3f} | {m['hit@4']:.3f} | "
                  f"{m['ndcg@10']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
