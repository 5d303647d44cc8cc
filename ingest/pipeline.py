"""walk → load → chunk → embed → upsert, one document at a time, with a per-file report.

A document's identity is its source (absolute path, or `upload/NAME` for browser uploads);
its version is the SHA-256 of its bytes. Unchanged documents cost no embedding work.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ingest.chunking import chunk_blocks, embedding_text
from ingest.loaders import load_document, supported_suffixes
from rag_app.embeddings import Embedder
from rag_app.errors import LoaderError
from rag_app.settings import ChunkSettings
from rag_app.store import ChunkStore

log = logging.getLogger(__name__)


@dataclass
class FileResult:
    path: str
    status: str  # ingested | unchanged | failed
    chunks: int = 0
    error: str | None = None


@dataclass
class IngestReport:
    results: list[FileResult] = field(default_factory=list)

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    def to_json(self) -> dict:
        return {
            "files": sum(r.status != "failed" for r in self.results),
            "chunks": sum(r.chunks for r in self.results if r.status == "ingested"),
            "ingested": sum(r.status == "ingested" for r in self.results),
            "unchanged": sum(r.status == "unchanged" for r in self.results),
            "failed": [{"path": r.path, "error": r.error} for r in self.failed],
            "results": [asdict(r) for r in self.results],
        }


@dataclass
class SourceFile:
    """Something to ingest: a source name and a way to read its bytes."""

    source: str
    read: Callable[[], bytes]


Progress = Callable[[FileResult], None]


def walk(paths: Iterable[Path]) -> Iterator[SourceFile | FileResult]:
    """Files under `paths` (recursively, hidden ones skipped); bad paths come out as failures."""
    suffixes = set(supported_suffixes())
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path).parts
                if p.is_file() and not any(part.startswith(".") for part in rel) \
                        and p.suffix.lower() in suffixes:
                    yield SourceFile(str(p.resolve()), p.read_bytes)
        elif path.is_file():
            yield SourceFile(str(path.resolve()), path.read_bytes)
        else:
            yield FileResult(str(path), "failed", error="no such file or folder")


class Ingestor:
    """Writes documents into a collection of the store."""

    def __init__(self, embedder: Embedder, store: ChunkStore, chunking: ChunkSettings) -> None:
        self.embedder = embedder
        self.store = store
        # Leave room for the title/heading line and the [CLS]/[SEP] tokens.
        self.size_tokens = min(chunking.size_tokens, embedder.max_tokens - 32)
        self.overlap_tokens = min(chunking.overlap_tokens, self.size_tokens // 2)

    def ingest(self, files: Iterable[SourceFile | FileResult], collection: str,
               progress: Progress | None = None) -> IngestReport:
        report = IngestReport()
        known = self.store.document_hashes(collection)
        for item in files:
            result = item if isinstance(item, FileResult) else self._one(item, collection, known)
            if result.status == "failed":
                log.warning("skipped %s: %s", result.path, result.error)
            report.results.append(result)
            if progress:
                progress(result)
        if any(r.status == "ingested" for r in report.results):
            self.store.refresh_indexes(collection)
        return report

    def _one(self, file: SourceFile, collection: str, known: dict[str, str]) -> FileResult:
        try:
            data = file.read()
            digest = hashlib.sha256(data).hexdigest()
            if known.get(file.source) == digest:
                return FileResult(file.source, "unchanged")
            rows = self._rows(file.source, data, digest)
        except OSError as e:
            return FileResult(file.source, "failed", error=f"cannot read: {e.strerror or e}")
        except LoaderError as e:
            return FileResult(file.source, "failed", error=str(e))
        self.store.upsert_document(collection, file.source, rows)
        known[file.source] = digest
        return FileResult(file.source, "ingested", chunks=len(rows))

    def _rows(self, source: str, data: bytes, digest: str) -> list[dict]:
        doc = load_document(data, source)
        chunks = chunk_blocks(doc.blocks, self.embedder.count_tokens, self.size_tokens,
                              self.overlap_tokens)
        vectors = self.embedder.embed_documents(
            [embedding_text(doc.title, c.heading, c.text) for c in chunks])
        now = datetime.now(timezone.utc)
        source_id = hashlib.sha1(source.encode()).hexdigest()[:16]
        return [
            {
                "id": f"{source_id}-{c.index}", "text": c.text, "vector": v, "source": source,
                "title": doc.title, "page": c.page, "page_end": c.page, "heading": c.heading,
                "chunk_index": c.index, "start_char": c.start_char, "end_char": c.end_char,
                "doc_hash": digest, "ingested_at": now, "embedding_model": self.embedder.name,
            }
            for c, v in zip(chunks, vectors, strict=True)
        ]
