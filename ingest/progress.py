"""Progress of an ingest, by files, chunks and bytes, with rate and ETA: a tqdm bar for a
person, or JSON lines for a script (`rag ingest --json`: one line per file and one every
few seconds, on stderr, so stdout keeps the one final report)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from tqdm import tqdm

from ingest.sources import FileResult, Item, SourceFile


class IngestProgress:
    """Called with each file's result (an `Ingestor.ingest` progress callback)."""

    def __init__(self, files: Sequence[Item], stream: IO[str], as_json: bool,
                 every_s: float = 5.0) -> None:
        self.sizes = {f.source: f.size or 0 for f in files if isinstance(f, SourceFile)}
        self.files_total = len(files)
        self.bytes_total = sum(self.sizes.values())
        self.files_done = self.chunks = self.failed = self.bytes_done = 0
        self.started = time.monotonic()
        self.stream = stream
        self.as_json = as_json
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bar = tqdm(total=self.bytes_total, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=as_json, file=stream, desc=f"0/{self.files_total} files")
        self._ticker = threading.Thread(target=self._tick, args=(every_s,), daemon=True)
        if as_json:
            self._ticker.start()

    def __call__(self, result: FileResult) -> None:
        with self._lock:
            self.files_done += 1
            self.chunks += result.chunks
            self.failed += result.status == "failed"
            size = self._bytes_of(result.path)
            self.bytes_done += size
            self.bar.set_description(f"{self.files_done}/{self.files_total} files",
                                     refresh=False)
            self.bar.set_postfix(chunks=self.chunks, failed=self.failed, refresh=False)
            self.bar.update(size)
            if self.as_json:
                self._emit({"event": "file", "path": result.path, "status": result.status,
                            "file_chunks": result.chunks})

    def _bytes_of(self, path: str) -> int:
        """The bytes a result accounts for: its file's, or its archive's at its first entry
        (`a.zip/inner.md`), once."""
        owner = path if path in self.sizes else next(
            (s for s in self.sizes if path.startswith(s + "/")), None)
        return self.sizes.pop(owner, 0) if owner is not None else 0

    def state(self) -> dict[str, Any]:
        """Counts so far, the byte rate and the estimated seconds left (None: unknown)."""
        elapsed = time.monotonic() - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0.0
        left = self.bytes_total - self.bytes_done
        return {"files_done": self.files_done, "files_total": self.files_total,
                "chunks": self.chunks, "failed": self.failed, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "elapsed_s": round(elapsed, 1),
                "bytes_per_s": round(rate, 1),
                "eta_s": round(left / rate, 1) if rate > 0 else None}

    def _emit(self, fields: dict[str, Any]) -> None:
        self.stream.write(json.dumps({**fields, **self.state()}, ensure_ascii=False) + "\n")
        self.stream.flush()

    def _tick(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._lock:
                self._emit({"event": "progress"})

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        self.bar.close()

    def __enter__(self) -> IngestProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
