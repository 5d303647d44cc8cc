"""The original bytes of uploaded documents, so a source card can open an upload at its
passage after the browser's copy is gone.

They live in a LanceDB database of their own beside the chunks' (`{db_uri}/originals`,
one table per collection, named like it), so they follow `db_uri` and its storage options
(a local folder or object storage) and never show up as a collection. A document's
original is written after its chunks and removed with them (`ChunkStore.delete_documents`).
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import lancedb
import pyarrow as pa

from rag_app.errors import StoreError
from rag_app.store import sql_string

log = logging.getLogger(__name__)
SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("doc_hash", pa.string()),
    pa.field("data", pa.large_binary()),
    pa.field("stored_at", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True)
class Original:
    source: str
    doc_hash: str
    data: bytes


def originals_uri(db_uri: str) -> str:
    return db_uri.rstrip("/") + "/originals"


class OriginalStore:
    """Originals by (collection, source); the database is opened on first use."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options or None
        self._db: Any = None

    @property
    def db(self) -> Any:
        if self._db is None:
            try:
                self._db = lancedb.connect(self.uri, storage_options=self.storage_options)
            except (OSError, ValueError) as e:
                raise StoreError(f"cannot open the originals' database {self.uri!r}: {e}") from e
        return self._db

    def _table(self, collection: str, create: bool = False) -> Any:
        try:
            return self.db.open_table(collection)
        except ValueError:
            if not create:
                return None
            return self.db.create_table(collection, schema=SCHEMA, exist_ok=True)

    def put(self, collection: str, originals: Iterable[Original]) -> None:
        """Store (or replace) these documents' originals, in one commit."""
        now = datetime.now(timezone.utc)
        rows = [{"source": o.source, "doc_hash": o.doc_hash, "data": o.data, "stored_at": now}
                for o in originals]
        if not rows:
            return
        try:
            table = self._table(collection, create=True)
            (table.merge_insert("source").when_matched_update_all()
             .when_not_matched_insert_all().execute(pa.Table.from_pylist(rows, schema=SCHEMA)))
        except (OSError, RuntimeError) as e:
            raise StoreError(f"cannot store the originals of {len(rows)} uploads in "
                             f"{self.uri!r}: {str(e).splitlines()[0]}") from e

    def get(self, collection: str, source: str) -> Original | None:
        table = self._table(collection)
        if table is None:
            return None
        rows = table.to_lance().to_table(filter=f"source = {sql_string(source)}").to_pylist()
        if not rows:
            return None
        return Original(rows[0]["source"], rows[0]["doc_hash"], rows[0]["data"])

    def sources(self, collection: str) -> set[str]:
        table = self._table(collection)
        if table is None:
            return set()
        return set(table.to_lance().to_table(columns=["source"]).column("source").to_pylist())

    def delete(self, collection: str, sources: Iterable[str]) -> int:
        sources = list(sources)
        table = self._table(collection) if sources else None
        if table is None:
            return 0
        where = "source IN (" + ", ".join(sql_string(s) for s in sources) + ")"
        try:
            return table.delete(where).num_deleted_rows
        except (OSError, RuntimeError) as e:
            raise StoreError(f"cannot delete originals in {self.uri!r}: "
                             f"{str(e).splitlines()[0]}") from e


@dataclass(frozen=True)
class Opened:
    """A source's bytes as they can be read now, or why they cannot (`problem`)."""

    source: str
    data: bytes | None = None
    problem: str | None = None
    changed: bool = False  # not the bytes that were ingested (the file was edited since)


UPLOAD_PREFIX = "upload/"
NOT_KEPT = ("its original was not kept (uploaded before originals were kept, larger than "
            "ui.max_upload_mb, or with ui.keep_originals off): upload it again to open it")


def open_source(originals: OriginalStore | None, collection: str, source: str,
                doc_hash: str | None, max_bytes: int) -> Opened:
    """An upload from its stored original; a file on disk (or an entry of a zip on disk)
    from its path, if it is still there and at most `max_bytes`."""
    if source.startswith(UPLOAD_PREFIX):
        kept = originals.get(collection, source) if originals is not None else None
        if kept is None:
            return Opened(source, problem=NOT_KEPT)
        return Opened(source, kept.data, changed=bool(doc_hash) and kept.doc_hash != doc_hash)
    try:
        data = _read_path(source, max_bytes)
    except OSError as e:
        return Opened(source, problem=f"cannot read it: {e.strerror or e}")
    if data is None:
        return Opened(source, problem=f"the file is no longer at {source}")
    changed = bool(doc_hash) and hashlib.sha256(data).hexdigest() != doc_hash
    return Opened(source, data, changed=changed)


def _read_path(source: str, max_bytes: int) -> bytes | None:
    path = Path(source)
    if path.is_file():
        if path.stat().st_size > max_bytes:
            raise OSError(f"larger than {max_bytes / 2**20:.0f} MB (ingestion.max_file_mb)")
        return path.read_bytes()
    at = source.lower().find(".zip/")
    if at < 0 or not Path(source[:at + 4]).is_file():
        return None
    inner = source[at + 5:]
    try:
        with zipfile.ZipFile(source[:at + 4]) as zf:
            # entries are named as ingest named them: without `..`, `/` or `\` parts
            member = next((m for m in zf.infolist() if _label(m.filename) == inner), None)
            if member is None or member.file_size > max_bytes:
                return None
            return zf.read(member)
    except (zipfile.BadZipFile, ValueError) as e:
        raise OSError(f"cannot open the archive: {e}") from e


def _label(name: str) -> str:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return "/".join(p for p in parts if p not in ("", "/", ".", ".."))


def available(originals: OriginalStore | None, collection: str, source: str) -> str | None:
    """Why `source` cannot be opened now (cheap: no read), or None."""
    if source.startswith(UPLOAD_PREFIX):
        kept = originals.sources(collection) if originals is not None else set()
        return None if source in kept else NOT_KEPT
    at = source.lower().find(".zip/")
    path = Path(source[:at + 4] if at >= 0 else source)
    return None if path.is_file() else f"the file is no longer at {source}"
