"""Where documents come from: folders (walked safely), files, and zip archives (read in
memory, never extracted). Everything comes out as a `SourceFile` or a failed `FileResult`."""

from __future__ import annotations

import fnmatch
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath

from ingest.loaders import supported_suffixes
from rag_app.settings import MAX_DEPTH


@dataclass
class FileResult:
    path: str
    status: str  # ingested | unchanged | failed | skipped (reported, not an error)
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


def walk(paths: Iterable[Path], pattern: str | None = None, *, max_depth: int = MAX_DEPTH,
         outside_links: bool = False) -> Iterator[Item]:
    """Files under `paths`: folders walked iteratively to `max_depth` levels (hidden entries
    skipped, symlinked folders not followed, so neither a loop nor a deep tree can exhaust
    the walk), filtered by suffix and an optional glob matched against the path relative
    to the folder. Only regular files come out: pipes, devices and sockets, missing
    paths, unreadable folders and (unless `outside_links`) links from inside a folder to
    files outside it come out as failures."""
    suffixes = {*supported_suffixes(), ".zip"}
    for path in paths:
        if path.is_dir():
            yield from _walk_folder(path, pattern, suffixes, max_depth, outside_links)
        elif path.exists() or path.is_symlink():
            yield _file(path)
        else:
            yield FileResult(str(path), "failed", error="no such file or folder")


def _walk_folder(top: Path, pattern: str | None, suffixes: set[str], max_depth: int,
                 outside_links: bool) -> Iterator[Item]:
    root = top.resolve()
    stack = [(top, 0)]
    while stack:  # depth first, in name order: a folder's files, then its folders
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield FileResult(str(folder), "failed",
                             error=f"cannot list folder: {e.strerror or e}")
            continue
        folders = []
        for entry in entries:
            p = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 > max_depth:
                    yield FileResult(str(p), "failed", error=f"more than {max_depth} folders "
                                     "deep: not walked (ingestion.max_depth)")
                else:
                    folders.append(p)
                continue
            rel = p.relative_to(top).as_posix()
            if p.suffix.lower() not in suffixes or (pattern and not fnmatch.fnmatch(rel,
                                                                                    pattern)):
                continue
            if entry.is_symlink() and not outside_links and not p.resolve().is_relative_to(
                    root):
                yield FileResult(str(p), "failed", error="a link to a file outside the "
                                 "folder: not followed (ingestion.outside_links)")
                continue
            yield _file(p)
        stack.extend((f, depth + 1) for f in reversed(folders))


def _file(path: Path) -> Item:
    try:
        info = path.stat()
    except OSError as e:
        return FileResult(str(path), "failed", error=f"cannot read: {e.strerror or e}")
    if not stat.S_ISREG(info.st_mode):
        return FileResult(str(path), "failed",
                          error="not a regular file (a pipe, device or socket)")
    resolved = str(path.resolve())
    return SourceFile(resolved, lambda: read_regular(resolved, info.st_size), info.st_size,
                      path=resolved)


def read_regular(path: str, size: int) -> bytes:
    """At most `size` bytes (what stat reported) of a regular file. Opened without blocking,
    checked again once open (the path may have been swapped for a pipe or a device since),
    so a read can neither hang nor run on forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path}: not a regular file (a pipe, device or socket)")
        return f.read(size)


def uploaded(name: str, size: int, read: Callable[[], bytes], max_upload_mb: int) -> Item:
    """A file uploaded through the browser or the HTTP API, as its source `upload/NAME`.
    The client's file name is only a label (any folders in it are dropped); a file above
    `max_upload_mb` (ui.max_upload_mb) is refused, unread."""
    label = PurePosixPath(name.replace("\\", "/")).name or "unnamed"
    source = f"upload/{label}"
    if size > max_upload_mb * 1024 * 1024:
        return FileResult(source, "failed", error=f"larger than ui.max_upload_mb={max_upload_mb}")
    return SourceFile(source, read, size)


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
        if not name.startswith(".") and name.lower().endswith(".zip"):
            yield FileResult(label, "skipped", error="a zip inside a zip: not opened (unzip "
                             "it and ingest its files)")
            continue
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
