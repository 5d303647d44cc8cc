"""The project's real-document evaluation set: 24 manuals nobody here wrote (Python and git
HTML pages, LaTeX PDF manuals, all from Debian 12 packages) and 48 questions written by
reading them, each with its gold passage named by document and a verbatim snippet.

    python benchmarks/corpus.py --pdf          # fetch the documents into .rag/corpus/
    python benchmarks/realdocs.py build        # -> .rag/realdocs/ (BEIR: corpus, queries, qrels)
    python benchmarks/realdocs.py              # every mode, a Markdown table
    rag eval .rag/realdocs --mode hybrid       # the same set through the CLI

`build` loads and chunks each document with the product's loader and chunker (the
embedder's tokenizer, `chunking.*` settings): one BEIR passage per chunk, its title the
context the embedder sees (document title > heading path), so the set follows the product
when chunking changes (`rag eval` ingests each passage as a text file: the title line is
part of the text BM25 reads, as in SciFact and SQuAD, where the product's full-text index
reads the chunk alone). A question's gold passages are the chunks of its document whose text
holds its snippet (whitespace-insensitive), or one of its `also` snippets: another passage
that answers the question in full, found when reading the misses (2 questions); a snippet
no chunk holds stops the build.
The questions (benchmarks/realdocs/questions.jsonl) are the project's own; the documents are
fetched, never committed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / ".rag" / "corpus"
OUT = ROOT / ".rag" / "realdocs"
QUESTIONS = Path(__file__).resolve().parent / "realdocs" / "questions.jsonl"
EVAL = ROOT.parent / "shared" / "eval"
PACKAGE_ROOTS = {
    "py": "python3.11-doc/usr/share/doc/python3.11/html",
    "git": "git-doc/usr/share/doc/git-doc",
    "tex": "texlive-latex-base-doc/usr/share/doc/texlive-doc/latex",
}
DOCUMENTS = [
    *(f"py/{p}" for p in (
        "library/json.html", "library/functools.html", "library/collections.html",
        "library/dataclasses.html", "library/contextlib.html", "library/itertools.html",
        "library/pathlib.html", "faq/design.html", "tutorial/errors.html",
        "tutorial/datastructures.html", "howto/sorting.html", "glossary.html")),
    *(f"git/{p}" for p in (
        "git-rebase.html", "git-stash.html", "git-bisect.html", "git-worktree.html",
        "gittutorial.html", "git-cat-file.html", "git-reset.html")),
    *(f"tex/{p}" for p in (
        "amsmath/amsldoc.pdf", "base/fntguide.pdf", "base/clsguide.pdf", "base/usrguide.pdf",
        "base/ltnews28.pdf")),
]
MODES = [("vector", None), ("fulltext", None), ("hybrid", "rrf"), ("hybrid", "zscore")]
_SPACE = re.compile(r"\s+")
# C0 controls other than tab and line breaks: pypdf leaves a few in amsldoc's text, where
# they would make `rag eval`'s text loader take the passage for binary and skip it
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def squash(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def document_path(key: str) -> Path:
    package, _, rest = key.partition("/")
    return CORPUS / PACKAGE_ROOTS[package] / rest


def passage_id(key: str, index: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", key.rsplit(".", 1)[0]) + f"-{index:03d}"


def load_questions(path: Path = QUESTIONS) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chunk_documents() -> dict[str, list[dict[str, Any]]]:
    """Each document's chunks as the product stores them (text, heading, title, embedder
    context), by document key."""
    from ingest.chunking import chunk_blocks, embedding_text
    from ingest.loaders import load_document
    from rag_app.embeddings import Embedder
    from rag_app.settings import load_settings

    settings = load_settings()
    embedder = Embedder(settings.embedding)
    size = min(settings.chunking.size_tokens, embedder.max_tokens - 32)  # as the Ingestor
    overlap = min(settings.chunking.overlap_tokens, size // 2)
    out = {}
    for key in DOCUMENTS:
        path = document_path(key)
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python benchmarks/corpus.py --pdf`")
        doc = load_document(path.read_bytes(), path.name, settings.ingestion)
        # `rag eval` ingests the context line as part of each passage's text: chunks are
        # made smaller by the longest one, so no passage is cut in two there
        context = max(embedder.count_tokens(embedding_text(doc.title, b.heading, ""))
                      for b in doc.blocks)
        chunks = chunk_blocks(doc.blocks, embedder.count_tokens, size - context - 2, overlap)
        out[key] = [{"text": c.text, "heading": c.heading, "page": c.page,
                     "context": embedding_text(doc.title, c.heading, "").strip()}
                    for c in chunks]
    return out


def build(out: Path) -> None:
    """Write the BEIR folder: corpus.jsonl (one passage a chunk), queries.jsonl, qrels."""
    docs = chunk_documents()
    questions = load_questions()
    qrels, problems = [], []
    for q in questions:
        if q["doc"] not in docs:
            problems.append(f"{q['_id']}: unknown document {q['doc']}")
            continue
        gold = []
        for snippet in [q["gold"], *q.get("also", [])]:
            held = [passage_id(q["doc"], i) for i, c in enumerate(docs[q["doc"]])
                    if squash(snippet) in squash(c["text"])]
            if not held:
                problems.append(f"{q['_id']}: no chunk of {q['doc']} holds {snippet!r}")
            gold += [pid for pid in held if pid not in gold]
        qrels += [(q["_id"], pid) for pid in gold]
    if problems:
        raise SystemExit("\n".join(problems))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for key, chunks in docs.items():
            for i, c in enumerate(chunks):
                row = {"_id": passage_id(key, i), "title": c["context"],
                       "text": _CONTROL.sub(" ", c["text"]), "doc": key, "page": c["page"]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (out / "queries.jsonl").open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps({"_id": q["_id"], "text": q["text"], "kind": q["kind"]},
                               ensure_ascii=False) + "\n")
    with (out / "qrels" / "test.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{qid}\t{pid}\t1\n" for qid, pid in qrels)
    passages = sum(len(c) for c in docs.values())
    print(f"{out}: {len(docs)} documents, {passages} passages, {len(questions)} questions "
          f"({dict(Counter(q['kind'] for q in questions))}), {len(qrels)} gold passages")


def measure(sets: list[Path], show_misses: bool) -> None:
    import torch

    from rag_app.evaluation import load_dataset, run_eval
    from rag_app.factory import Services
    from rag_app.settings import load_settings

    torch.set_num_threads(int(os.environ.get("RAG_BENCH_THREADS", "1")))
    settings = load_settings()
    services = Services(settings)
    rows, misses = [], []
    for path in sets:
        kinds = {str(q["_id"]): q.get("kind") for q in load_dataset(path).queries}
        for mode, fusion in MODES:
            out = run_eval(services, path, None, mode, settings.retrieval.k, answer=False,
                           fusion=fusion)
            label = f"hybrid ({fusion})" if fusion else mode
            rows.append((out, label, _by_kind(out["ranks"], kinds)))
            misses += [(out["dataset"], label, qid, rank) for qid, rank in out["ranks"].items()
                       if rank is None or rank > 1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"(shared), {torch.get_num_threads()} torch thread; embedder "
          f"`{settings.embedding.model}`, chunks {settings.chunking.size_tokens} tokens, "
          f"fusion weight {settings.retrieval.vector_weight}\n")
    print("| set | mode | queries | top-1 | top-4 | nDCG@10 | MRR@10 | top-4 by kind |")
    print("|---|---|---|---|---|---|---|---|")
    for out, label, by_kind in rows:
        r = out["retrieval"]
        print(f"| {out['dataset']} | {label} | {out['queries']} | {r['hit@1']:.3f} | "
              f"{r['hit@4']:.3f} | {r['ndcg@10']:.3f} | {r['mrr@10']:.3f} | {by_kind} |")
    if show_misses:
        print("\nnot at rank 1 (rank; - = not in the top 10):")
        for dataset, label, qid, rank in misses:
            print(f"  {dataset} {label} {qid}: {rank or '-'}")


def _by_kind(ranks: dict[str, int | None], kinds: dict[str, Any]) -> str:
    counts: dict[str, list[int]] = {}
    for qid, rank in ranks.items():
        hit = counts.setdefault(str(kinds.get(qid)), [0, 0])
        hit[0] += rank is not None and rank <= 4
        hit[1] += 1
    return ", ".join(f"{k} {a}/{n}" for k, (a, n) in sorted(counts.items())) if len(counts) > 1 \
        else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="measure", choices=["build", "measure"])
    ap.add_argument("--sets", nargs="+", type=Path, default=[OUT],
                    help="BEIR folders to measure (default: the real-document set); e.g. "
                    f"{EVAL}/squad-dev-500 {EVAL}/scifact/subset_1k")
    ap.add_argument("--out", type=Path, default=OUT, help="build: the folder to write")
    ap.add_argument("--misses", action="store_true", help="list the questions not at rank 1")
    args = ap.parse_args()
    if args.command == "build":
        build(args.out)
    else:
        measure(args.sets, args.misses)


if __name__ == "__main__":
    main()
