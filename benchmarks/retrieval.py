"""Retrieval at scale: LanceDB tables of 10k → 1M chunks, with and without the vector index.

    .venv/bin/python benchmarks/retrieval.py [--sizes 10000 100000 1000000] [--queries 200]

Vectors are not uniform noise (that makes every ANN index look broken, ../shared/benchmarks.md):
they are real all-MiniLM-L6-v2 embeddings of the SQuAD and SciFact passages under
../shared/eval/, each synthetic chunk a real passage plus a fraction of another plus noise,
so the table has the cluster structure of real text. Queries are the real questions and claims
of those sets, embedded by the same model. Every chunk carries its passage's text (plus a unique
word), so full-text and hybrid search run on real words.

Per size it prints: index build times (the product's automatic vector index, and the FTS
index), query latency p50/p95 for vector, full-text and hybrid search through `ChunkStore.search`
(the product path, result conversion included), recall@10 of the vector search against exact
search, and the physical reference: an exact numpy matrix-product top-k over the same vectors.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rag_app.factory import Services
from rag_app.fusion import fusion_reranker
from rag_app.settings import Settings, load_settings
from rag_app.store import chunk_schema

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
SETS = ("squad-dev-500", "scifact/subset_1k")


def _jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f]


def base_data(services: Services, cache: Path) -> tuple[np.ndarray, list[str], np.ndarray,
                                                           list[str]]:
    """Real passage and query embeddings, computed once and cached."""
    if cache.exists():
        z = np.load(cache, allow_pickle=True)
        return z["docs"], list(z["texts"]), z["queries"], list(z["qtexts"])
    texts, qtexts = [], []
    for name in SETS:
        folder = EVAL / name
        texts += [f"{d['title']}\n{d['text']}" for d in _jsonl(folder / "corpus.jsonl")]
        queries = folder / "queries.jsonl"
        qtexts += [q["text"] for q in _jsonl(queries)]
    docs = np.asarray(services.embedder.embed_documents(texts), dtype=np.float32)
    queries = np.asarray([services.embedder.embed_query(q) for q in qtexts], dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, docs=docs, texts=np.array(texts, dtype=object), queries=queries,
             qtexts=np.array(qtexts, dtype=object))
    return docs, texts, queries, qtexts


def synthesize(n: int, docs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors: a real passage + up to half of another + noise; and their base index."""
    a = rng.integers(0, len(docs), n)
    b = rng.integers(0, len(docs), n)
    vecs = docs[a] + rng.uniform(0, 0.5, (n, 1)).astype(np.float32) * docs[b]
    vecs += rng.normal(0, 0.03, vecs.shape).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs, a


def write_table(services: Services, collection: str, vecs: np.ndarray, base: np.ndarray,
                texts: list[str]) -> None:
    store = services.store
    schema = chunk_schema(store.dim, store.embedding_model)
    table = store.db.create_table(collection, schema=schema, mode="overwrite")
    step = 100_000
    for start in range(0, len(vecs), step):
        idx = range(start, min(start + step, len(vecs)))
        cols = {
            "id": pa.array([f"c{i}" for i in idx]),
            "text": pa.array([f"{texts[base[i]][:400]} w{i}" for i in idx]),
            "vector": pa.FixedSizeListArray.from_arrays(vecs[start:idx.stop].ravel(), store.dim),
            "source": pa.array([f"doc{base[i]}.txt" for i in idx]),
        }
        batch = pa.table({f.name: cols.get(f.name, pa.nulls(len(idx), f.type))
                          for f in schema}, schema=schema)
        table.add(batch)


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 95))


def timed(fn, items) -> tuple[list, list[float]]:
    out, ms = [], []
    for item in items:
        t = time.perf_counter()
        out.append(fn(item))
        ms.append((time.perf_counter() - t) * 1000)
    return out, ms


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth,
                                                                         strict=True)]))


def bench_size(settings: Settings, n: int, docs: np.ndarray, texts: list[str],
               queries: np.ndarray, qtexts: list[str], k: int) -> list[tuple]:
    services = Services(settings)
    store = services.store
    rng = np.random.default_rng(n)
    vecs, base = synthesize(n, docs, rng)
    collection = f"bench_{n}"
    write_table(services, collection, vecs, base, texts)
    rows = []

    # The physical reference: exact cosine top-k as one matrix-vector product.
    def numpy_topk(q: np.ndarray) -> list[str]:
        scores = vecs @ q
        top = np.argpartition(-scores, k)[:k]
        return [f"c{i}" for i in top[np.argsort(-scores[top])]]

    truth, ms = timed(numpy_topk, queries)
    rows.append((n, "numpy matmul top-k (exact)", "—", *percentiles(ms), 1.0))

    def search(mode: str):
        fuse = fusion_reranker(settings.retrieval) if mode == "hybrid" else None

        def run(i: int) -> list[str]:
            hits = store.search(collection, qtexts[i], queries[i], k, mode=mode, reranker=fuse)
            return [h.metadata["id"] for h in hits]
        return run

    idx = range(len(queries))
    if n <= 100_000:
        found, ms = timed(search("vector"), idx)
        rows.append((n, "vector, no index (exact scan)", "—", *percentiles(ms),
                     recall(found, truth)))

    t = time.perf_counter()
    store.refresh_indexes(collection)
    build_s = time.perf_counter() - t
    indices = {i.index_type for i in store.db.open_table(collection).list_indices()}
    label = "+".join(sorted(indices))
    found, ms = timed(search("vector"), idx)
    rows.append((n, f"vector ({label})", f"{build_s:.1f}", *percentiles(ms),
                 recall(found, truth)))
    _, ms = timed(search("fulltext"), idx)
    rows.append((n, "full-text (BM25)", "", *percentiles(ms), None))
    found, ms = timed(search("hybrid"), idx)
    rows.append((n, "hybrid (vector + BM25, z-score fusion)", "", *percentiles(ms), None))
    store.db.drop_table(collection)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(db_uri=str(Path(tmp) / "db"))
        services = Services(settings)
        docs, texts, queries, qtexts = base_data(
            services, settings.llm.cache_dir / "bench" /
            f"retrieval_base_{services.embedder.name.replace('/', '_')}.npz")
        pick = np.random.default_rng(0).choice(len(queries), args.queries, replace=False)
        queries, qtexts = queries[pick], [qtexts[i] for i in pick]
        rows = []
        for n in args.sizes:
            rows += bench_size(settings, n, docs, texts, queries, qtexts, args.k)
            print(f"... {n} rows done", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {args.queries} queries, top-{args.k}\n")
    print("| chunks | method | build s | p50 ms | p95 ms | recall@10 vs exact |")
    print("|---:|---|---:|---:|---:|---:|")
    for n, method, build, p50, p95, rec in rows:
        r = "" if rec is None else f"{rec:.3f}"
        print(f"| {n:,} | {method} | {build} | {p50:.1f} | {p95:.1f} | {r} |")


if __name__ == "__main__":
    main()
