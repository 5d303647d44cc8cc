"""Where documents come from: folders (walked safely), files, and zip archives (read in
memory, never extracted). Everything comes out as a `SourceFile` or a failed `FileResult`."""

from __future__ import annotations

import fnmatch
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath

from ingest.loaders import supported_suffixes


@dataclass
class FileResult:
    path: str
    status: str  # ingested | unchanged | failed
    chunks: int = 0
    error: str | None = None


@dataclass
class SourceFile:
    """Something to ingest: a source name (its identity) and a way to read its bytes.
    `path` is set for a file on disk (another process can read it there), None for zip
    entries and uploads (bytes held in memory)."""

    source: str
    read: Callable[[], bytes]
    size: int | None = None
    path: str | None = None


Item = SourceFile | FileResult


def walk(paths: Iterable[Path], pattern: str | None = None) -> Iterator[Item]:
    """Files under `paths`: folders recursively (hidden entries skipped, symlinked folders not
    followed, so a symlink loop cannot recurse), filtered by suffix and an optional glob
    matched against the path relative to the folder. Missing paths come out as failures."""
    suffixes = {*supported_suffixes(), ".zip"}
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    p = Path(root) / name
                    rel = p.relative_to(path).as_posix()
                    if name.startswith(".") or p.suffix.lower() not in suffixes:
                        continue
                    if pattern and not fnmatch.fnmatch(rel, pattern):
                        continue
                    yield _file(p)
        elif path.is_file():
            yield _file(path)
        else:
            yield FileResult(str(path), "failed", error="no such file or folder")


def _file(path: Path) -> Item:
    try:
        size = path.stat().st_size
    except OSError as e:
        return FileResult(str(path), "failed", error=f"cannot read: {e.strerror or e}")
    resolved = str(path.resolve())
    return SourceFile(resolved, path.read_bytes, size, path=resolved)


def safe_member_name(name: str) -> str:
    """An archive member name as a label: no absolute paths, no `..`, no backslashes."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts
             if p not in ("", "/", ".", "..")]
    return "/".join(parts)


def expand_zip(archive: SourceFile, data: bytes, max_total_bytes: int,
               max_file_bytes: int) -> Iterator[Item]:
    """Entries of a zip as files named `archive.zip/inner/path`, read in memory.

    Reads are bounded by the real decompressed size (not the header's claim), so a zip bomb
    stops at `max_total_bytes`.
    """
    suffixes = set(supported_suffixes())
    try:
        zf = zipfile.ZipFile(BytesIO(data))
        members = [m for m in zf.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        yield FileResult(archive.source, "failed", error=f"cannot open zip: {e}")
        return
    budget = max_total_bytes
    for m in members:
        label = f"{archive.source}/{safe_member_name(m.filename)}"
        name = PurePosixPath(label).name
        if name.startswith(".") or PurePosixPath(name).suffix.lower() not in suffixes:
            continue
        limit = min(budget, max_file_bytes)
        try:
            with zf.open(m) as f:
                content = f.read(limit + 1)
        except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as e:
            yield FileResult(label, "failed", error=f"cannot read zip entry: {e}")
            continue
        if len(content) > limit:
            why = ("archive exceeds ingestion.max_archive_mb uncompressed"
                   if limit == budget else "larger than ingestion.max_file_mb")
            yield FileResult(label, "failed", error=why)
            if limit == budget:
                return
            continue
        budget -= len(content)
        yield SourceFile(label, lambda c=content: c, len(content))
