"""The Documents page's progress of an upload: files done, and what the current file or
batch is at (reading one file, embedding chunk i of n, writing), as the ingest goes."""

from __future__ import annotations

import time
from pathlib import PurePosixPath

import streamlit as st

from ingest.pipeline import FileResult, IngestStep
from ui import render


class UploadProgress:
    """`file_done` and `step` are the `progress` and `steps` callbacks of `Ingestor.ingest`."""

    def __init__(self, files: int) -> None:
        self.files = files
        self.done = 0
        self.bar = st.progress(0.0, text=f"0/{files} files · starting…")
        self.started: float | None = None  # of the current batch's embedding

    def file_done(self, result: FileResult) -> None:
        self.done += 1
        self.bar.progress(min(1.0, self.done / max(1, self.files)),
                          text=f"{self.done}/{self.files} files · "
                          + render.escape_markdown(f"{_name(result.path)}: {result.status}"))

    def step(self, step: IngestStep) -> None:
        name = _name(step.path)
        others = f" and {step.files - 1} more" if step.files > 1 else ""
        part = 0.0
        if step.stage == "reading":
            now = f"reading {name}"
        elif step.stage == "embedding":
            if step.chunks_done == 0:
                self.started = time.monotonic()
            rate = self._rate(step.chunks_done)
            now = (f"embedding chunk {step.chunks_done + 1}/{step.chunks_total} of "
                   f"{name}{others}{rate}")
            part = step.chunks_done / max(1, step.chunks_total)
        else:
            now, part = f"writing {step.chunks_total} chunks of {name}{others}", 1.0
        fraction = (self.done + 0.95 * part * step.files) / max(1, self.files)
        self.bar.progress(min(1.0, fraction), text=f"{self.done}/{self.files} files · "
                          + render.escape_markdown(now))

    def _rate(self, chunks: int) -> str:
        elapsed = time.monotonic() - (self.started or time.monotonic())
        return f" · {chunks / elapsed:.1f} chunks/s" if chunks and elapsed > 0 else ""


def _name(path: str) -> str:
    return PurePosixPath(path).name
