"""walk → load → chunk → embed → upsert, with a per-file report.

A document's identity is its source (absolute path, `upload/NAME` for browser uploads,
`archive.zip/inner/path` for zip entries); its version is the SHA-256 of its bytes.
Unchanged documents cost no embedding work. Chunks of several documents are embedded
together (the embedder is fastest on full batches) and written with one `merge_insert`
that replaces those documents whole, so a crash never leaves half a document visible.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

from ingest.chunking import chunk_blocks, embedding_text
from ingest.loaders import LoadedDocument, load_document
from ingest.parser import Parser
from ingest.sources import FileResult, Item, SourceFile, expand_zip, uploaded, walk
from rag_app.embeddings import Embedder
from rag_app.errors import LoaderError
from rag_app.originals import UPLOAD_PREFIX, Original
from rag_app.settings import ChunkSettings, IngestionSettings
from rag_app.store import ChunkStore

__all__ = ["FileResult", "IngestReport", "IngestStep", "Ingestor", "Parser", "SourceFile",
           "document_rows", "uploaded", "walk"]
log = logging.getLogger(__name__)
MB = 1024 * 1024
NAME_TAKEN = ("a different document of this name is already in the collection: rename the "
              "file, or upload it with 'replace'")


@dataclass
class IngestReport:
    results: list[FileResult] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def skipped(self) -> list[FileResult]:
        """Reported, not read, and not an error (a zip inside a zip)."""
        return [r for r in self.results if r.status == "skipped"]

    def to_json(self) -> dict[str, Any]:
        return {
            "files": sum(r.status in ("ingested", "unchanged") for r in self.results),
            "chunks": sum(r.chunks for r in self.results if r.status == "ingested"),
            "ingested": sum(r.status == "ingested" for r in self.results),
            "unchanged": sum(r.status == "unchanged" for r in self.results),
            "removed": self.removed,
            "failed": [{"path": r.path, "error": r.error} for r in self.failed],
            "skipped": [{"path": r.path, "reason": r.error} for r in self.skipped],
            "results": [asdict(r) for r in self.results],
        }


@dataclass
class _Pending:
    result: FileResult
    rows: list[dict[str, Any]]
    texts: list[str]
    original: bytes | None = None  # an upload's bytes, kept once its chunks are written


@dataclass(frozen=True)
class IngestStep:
    """What an ingest is doing between two file results: reading (and parsing) a file
    (`path`), or embedding a batch of `files` files whose first is `path` (`chunks_done`
    of `chunks_total`), or writing that batch."""

    stage: str  # reading (and parsing) | embedding | writing
    path: str
    files: int = 1
    chunks_done: int = 0
    chunks_total: int = 0


Progress = Callable[[FileResult], None]
Steps = Callable[[IngestStep], None]


class Ingestor:
    """Writes documents into a collection of the store. Files are parsed by `parser` (a
    process with a memory limit and a deadline per file; by default one of its own, started
    on the first file that needs parsing), chunked and embedded here."""

    def __init__(self, embedder: Embedder, store: ChunkStore, chunking: ChunkSettings,
                 limits: IngestionSettings | None = None, parser: Parser | None = None,
                 keep_originals_mb: float | None = None) -> None:
        """`keep_originals_mb`: keep the original bytes of uploads (`upload/NAME`) up to
        this size in `store.originals`, for opening them at a passage; None keeps none."""
        self.embedder = embedder
        self.keep_originals_mb = keep_originals_mb
        self.store = store
        self.limits = limits or IngestionSettings()
        self.parser = parser or Parser(self.limits)
        # Leave room for the title/heading line and the [CLS]/[SEP] tokens.
        self.size_tokens = min(chunking.size_tokens, embedder.max_tokens - 32)
        self.overlap_tokens = min(chunking.overlap_tokens, self.size_tokens // 2)

    def ingest(self, files: Iterable[Item], collection: str, progress: Progress | None = None,
               sync_prefixes: Iterable[str] = (), sync_glob: str | None = None,
               replace: bool = True, steps: Steps | None = None) -> IngestReport:
        """Ingest `files`, calling `progress` with each file's result and `steps` (if
        given) as each file is read and each embedding batch is done. With
        `sync_prefixes`, also remove stored documents under those prefixes that were not
        seen in `files` (their files are gone): only those the walk
        would have selected (`sync_glob`, the walk's pattern) and none under a path that
        failed (an unreadable folder or archive proves nothing gone).

        `replace=False` (uploads): a file whose name is already a different document of the
        collection is reported, not stored over it (another user's `report.md`, say)."""
        report = IngestReport()
        known = self.store.document_hashes(collection)
        seen: dict[str, tuple[str, str | None]] = {}  # source -> (digest, error) this run
        pending: list[_Pending] = []

        def finish(result: FileResult) -> None:
            if result.status == "failed":
                log.warning("skipped %s: %s", result.path, result.error)
            report.results.append(result)
            if progress:
                progress(result)

        for item in self._expanded(files):
            if isinstance(item, FileResult):
                finish(item)
                continue
            if steps:
                steps(IngestStep("reading", item.source))
            prepared = self._prepare(item, known, seen, replace)
            if isinstance(prepared, FileResult):
                finish(prepared)
                continue
            pending.append(prepared)
            if sum(len(p.rows) for p in pending) >= self.limits.batch_chunks:
                self._flush(collection, pending, finish, steps)
        self._flush(collection, pending, finish, steps)
        return self._conclude(collection, report, known, sync_prefixes, sync_glob)

    def sync_plan(self, files: Iterable[Item], collection: str, sync_prefixes: Iterable[str],
                  sync_glob: str | None = None) -> list[str]:
        """What `ingest(..., sync_prefixes)` would remove (documents whose files are gone),
        without reading, parsing or writing any document: archives are opened for their
        entry names only. Nothing under a path that fails to walk or open is listed."""
        known = self.store.document_hashes(collection)
        seen, failed = set(), []
        for item in self._expanded(files):
            seen.add(item.path if isinstance(item, FileResult) else item.source)
            if isinstance(item, FileResult) and item.status == "failed":
                failed.append(_archive(item.path))
        prefixes = list(sync_prefixes)
        return sorted(s for s in known if s not in seen
                      and any(proven_gone(s, p, sync_glob) for p in prefixes)
                      and not any(_under(s, f) for f in failed))

    def _conclude(self, collection: str, report: IngestReport, known: dict[str, str],
                  sync_prefixes: Iterable[str], sync_glob: str | None = None) -> IngestReport:
        """Remove synced documents whose files are gone; bring the indexes up to date (also
        after a run that wrote nothing: a crash may have come before an index update)."""
        if sync_prefixes:
            seen = {r.path for r in report.results}
            # a failed entry of an archive stops its reading (a size limit): the archive's
            # other entries may be unread, not gone
            failed = [_archive(r.path) for r in report.results if r.status == "failed"]
            gone = [s for s in known if s not in seen
                    and any(proven_gone(s, p, sync_glob) for p in sync_prefixes)
                    and not any(_under(s, f) for f in failed)]
            self.store.delete_documents(collection, gone)
            report.removed = sorted(gone)
        self.store.refresh_indexes(collection)
        return report

    def _expanded(self, files: Iterable[Item]) -> Iterator[Item]:
        """Open zip archives into their entries; refuse files above the size limit."""
        max_file = int(self.limits.max_file_mb * MB)
        for item in files:
            if isinstance(item, SourceFile) and item.size is not None and item.size > max_file:
                yield FileResult(item.source, "failed", error=(
                    f"{item.size / MB:.1f} MB is larger than ingestion.max_file_mb="
                    f"{self.limits.max_file_mb:g}"))
            elif isinstance(item, SourceFile) and item.source.lower().endswith(".zip"):
                try:
                    data = item.read()
                except OSError as e:
                    yield FileResult(item.source, "failed", error=f"cannot read: {e}")
                    continue
                yield from expand_zip(item, data, int(self.limits.max_archive_mb * MB),
                                      max_file)
            else:
                yield item

    def _prepare(self, file: SourceFile, known: dict[str, str],
                 seen: dict[str, tuple[str, str | None]], replace: bool = True
                 ) -> _Pending | FileResult:
        try:
            data = file.read()
        except OSError as e:
            return FileResult(file.source, "failed", error=f"cannot read: {e.strerror or e}")
        digest = hashlib.sha256(data).hexdigest()
        if file.source in seen:  # one name, one document: two would be merged into one
            return _repeat(file.source, digest, *seen[file.source])
        seen[file.source] = (digest, None)
        if known.get(file.source) == digest:
            return FileResult(file.source, "unchanged")
        if not replace and file.source in known:
            return FileResult(file.source, "failed", error=NAME_TAKEN)
        try:
            rows, texts = self._rows(file.source, data, digest)
        except LoaderError as e:
            seen[file.source] = (digest, str(e))
            return FileResult(file.source, "failed", error=str(e))
        known[file.source] = digest
        return _Pending(FileResult(file.source, "ingested", chunks=len(rows)), rows, texts,
                        data if self._keeps(file.source, data) else None)

    def _keeps(self, source: str, data: bytes) -> bool:
        """Is this the upload of a document whose original is kept?"""
        return (self.keep_originals_mb is not None and self.store.originals is not None
                and source.startswith(UPLOAD_PREFIX) and len(data) <= self.keep_originals_mb * MB)

    def _flush(self, collection: str, pending: list[_Pending],
               finish: Callable[[FileResult], None], steps: Steps | None = None) -> None:
        if not pending:
            return
        vectors = self._embed(pending, steps)
        rows = iter(vectors)
        for p in pending:
            for row in p.rows:
                row["vector"] = next(rows)
        if steps:
            steps(IngestStep("writing", pending[0].result.path, len(pending),
                             len(vectors), len(vectors)))
        self.store.upsert_documents(collection, {p.result.path: p.rows for p in pending})
        kept = [Original(p.result.path, p.rows[0]["doc_hash"], p.original)
                for p in pending if p.original is not None and p.rows]
        if kept and self.store.originals is not None:
            self.store.originals.put(collection, kept)
        for p in pending:
            finish(p.result)
        pending.clear()

    def _embed(self, pending: list[_Pending], steps: Steps | None) -> list[list[float]]:
        """The batch's vectors, one embedder batch at a time, so `steps` can follow."""
        texts = [t for p in pending for t in p.texts]
        if steps is None:
            return self.embedder.embed_documents(texts)
        vectors: list[list[float]] = []
        step = max(1, self.embedder.batch_size)
        for start in range(0, len(texts), step):
            steps(IngestStep("embedding", pending[0].result.path, len(pending), start,
                             len(texts)))
            vectors += self.embedder.embed_documents(texts[start:start + step])
        return vectors

    def _rows(self, source: str, data: bytes, digest: str) -> tuple[list[dict], list[str]]:
        doc = self.parser.parse(data, PurePosixPath(source).name)
        return chunk_rows(source, doc, digest, self.embedder.count_tokens, self.size_tokens,
                          self.overlap_tokens, self.embedder.name)


def _repeat(source: str, digest: str, first_digest: str, first_error: str | None
            ) -> FileResult:
    """A source met again in one run: the same bytes are the same document (unchanged, or
    the same failure); other bytes under the same name are refused, not merged into it."""
    if digest != first_digest:
        return FileResult(source, "failed", error="another file in this batch has the same "
                          "name: only the first is ingested (rename one)")
    if first_error is not None:
        return FileResult(source, "failed", error=first_error)
    return FileResult(source, "unchanged")


def document_rows(source: str, data: bytes, digest: str, count_tokens: Callable[[str], int],
                  size_tokens: int, overlap_tokens: int, embedding_model: str,
                  limits: IngestionSettings) -> tuple[list[dict], list[str]]:
    """Parse (in this process, within the page and unpacked-size limits of `limits`) and
    chunk one document's bytes; raises `LoaderError` for a file that cannot be parsed."""
    doc = load_document(data, PurePosixPath(source).name, limits)
    return chunk_rows(source, doc, digest, count_tokens, size_tokens, overlap_tokens,
                      embedding_model)


def chunk_rows(source: str, doc: LoadedDocument, digest: str,
               count_tokens: Callable[[str], int], size_tokens: int, overlap_tokens: int,
               embedding_model: str) -> tuple[list[dict], list[str]]:
    """A parsed document's table rows (`vector` still None) and the texts to embed, one per
    row. Pure (shared by the local and the Ray engines)."""
    chunks = chunk_blocks(doc.blocks, count_tokens, size_tokens, overlap_tokens)
    now = datetime.now(timezone.utc)
    source_id = hashlib.sha1(source.encode()).hexdigest()[:16]
    rows = [
        {
            "id": f"{source_id}-{c.index}", "text": c.text, "vector": None, "source": source,
            "title": doc.title, "page": c.page, "page_end": c.page_end,
            "page_label": c.page_label, "heading": c.heading,
            "chunk_index": c.index, "start_char": c.start_char, "end_char": c.end_char,
            "doc_hash": digest, "ingested_at": now, "embedding_model": embedding_model,
        }
        for c in chunks
    ]
    return rows, [embedding_text(doc.title, c.heading, c.text) for c in chunks]


def _archive(source: str) -> str:
    """The file on disk a source comes from: a zip entry's archive, else itself."""
    at = source.lower().find(".zip/")
    return source[:at + 4] if at >= 0 else source


def _under(source: str, prefix: str) -> bool:
    return source == prefix or source.startswith(prefix.rstrip("/") + "/")


def proven_gone(source: str, root: str, pattern: str | None) -> bool:
    """Would a walk of `root` with `pattern` have yielded `source` (so, not yielded, its file
    is gone)? A zip entry stands or falls with its archive; a root given as a file is
    always walked, a file inside a folder only if the pattern selects it."""
    if source == root:
        return True
    if not _under(source, root):
        return False
    rel = _archive(source)[len(root.rstrip("/")) + 1:]
    return pattern is None or fnmatch.fnmatch(rel, pattern)

