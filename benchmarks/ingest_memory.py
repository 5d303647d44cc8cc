"""Peak memory of `rag ingest` as the corpus grows: the pipeline streams files through in
batches of `ingestion.batch_chunks`, so peak RSS should not grow with the corpus.

    .venv/bin/python benchmarks/ingest_memory.py [--sizes-mb 1 3 9]

Each size is a fresh folder of 100 KB text files (varied English-like prose) ingested by a
real `rag ingest` process into a fresh database; the peak RSS of that process is read with
getrusage. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAG = str(Path(sys.executable).with_name("rag"))
_VOCABULARY = ("the of and to in is was for on that with as by at from his her an were which are "
         "this be had not but have first one their its new after who they two also has been "
         "other into during time more these some would all there can only when made used "
         "river city music school team season album church village species film station "
         "government population company system water island game district century war")
WORDS = _VOCABULARY.split()


def write_corpus(folder: Path, megabytes: float, rng: random.Random) -> int:
    folder.mkdir(parents=True)
    target, written, n = int(megabytes * 1024 * 1024), 0, 0
    while written < target:
        paras = []
        size = 0
        while size < 100_000:
            para = " ".join(rng.choice(WORDS) for _ in range(120)) + "."
            paras.append(para)
            size += len(para) + 2
        text = f"# Note {n}\n\n" + "\n\n".join(paras)
        (folder / f"note{n:05d}.md").write_text(text)
        written += len(text)
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 3, 9])
    args = parser.parse_args()
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes_mb:
            corpus = Path(tmp) / f"corpus{mb:g}"
            files = write_corpus(corpus, mb, rng)
            env = {**os.environ, "RAG_DB_URI": str(Path(tmp) / f"db{mb:g}"),
                   "HF_HUB_OFFLINE": "1"}
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            started = time.perf_counter()
            out = subprocess.run([RAG, "ingest", str(corpus), "--json"], env=env,
                                 capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - started
            peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            chunks = json.loads(out.stdout)["chunks"]
            # ru_maxrss of children is the maximum over all of them: report it only if this
            # child raised it, else "≤" the previous peak.
            rows.append((mb, files, chunks, seconds, peak_kb / 1024, peak_kb > before))
            print(f"... {mb:g} MB done", file=sys.stderr, flush=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, batch_chunks default\n")
    print("| corpus MB | files | chunks | ingest s | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|")
    for mb, files, chunks, seconds, peak, raised in rows:
        print(f"| {mb:g} | {files} | {chunks:,} | {seconds:.0f} | "
              f"{'' if raised else '≤ '}{peak:.0f} |")


if __name__ == "__main__":
    main()
