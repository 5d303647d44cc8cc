"""Parsing with a budget: files are parsed in a separate process, one file at a time, with
its memory limited (`ingestion.parse_memory_mb`) and a deadline (`ingestion.parse_timeout_s`).
A file over either is reported by name and the process replaced; the batch goes on.

The process is started on first use (a fresh interpreter, `python -c`, that imports only
the loaders, never torch, the embedder or the caller's main script, which multiprocessing's
spawn would re-run) and reused for every later file, so the common path costs one round
trip over a socket pair per file. Chunking and embedding stay in the caller: the embedder
is loaded once, there. Only the parsers, which run on untrusted bytes and can be made to
take hours (a PDF of a million pages) or gigabytes (a decompression bomb), run here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from typing import Any

from ingest.loaders import LoadedDocument, load_document
from rag_app.errors import LoaderError
from rag_app.settings import IngestionSettings

log = logging.getLogger(__name__)
MB = 1024 * 1024
START_TIMEOUT_S = 120  # a fresh interpreter importing the parsers, on a busy machine
# The child finds the modules where this process found them (a source checkout, a venv).
_BOOT = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
         "from ingest.parser import main; main(int(sys.argv[2]))")
ORPHAN_GRACE_S = 5  # the process stops itself this long after a deadline its parent missed


class Parser:
    """Parses documents in a child process within `limits`; thread-safe (one file at a
    time). `parse` raises `LoaderError` for a bad file, or one over a limit."""

    def __init__(self, limits: IngestionSettings) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.starts = 0  # processes started (one unless a file was over a limit)

    def parse(self, data: bytes, name: str) -> LoadedDocument:
        with self._lock:
            kind, value = self._ask(data, name)
            if kind == "memory":
                self.close()  # a fresh process for the next file, not one out of memory
                raise LoaderError(f"over the memory limit of {self.limits.parse_memory_mb} "
                                  "MB (ingestion.parse_memory_mb): not parsed")
        if kind == "error":
            raise LoaderError(value)
        return value

    def _ask(self, data: bytes, name: str) -> tuple[str, Any]:
        conn = self._ready()
        try:
            conn.send((data, name))
            answered = conn.poll(self.limits.parse_timeout_s)
            if not answered:
                self.close()
                raise LoaderError(f"over the parse time limit of "
                                  f"{self.limits.parse_timeout_s:g} s "
                                  "(ingestion.parse_timeout_s): not parsed")
            return conn.recv()
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise LoaderError(self._died()) from None

    def close(self) -> None:
        """Stop the process (the next `parse` starts another)."""
        _stop(self._proc, self._conn)
        self._proc = self._conn = None

    def __enter__(self) -> Parser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ready(self) -> Connection:
        if self._proc is not None and self._proc.poll() is None and self._conn is not None:
            return self._conn
        self.close()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
                [sys.executable, "-c", _BOOT, json.dumps(sys.path), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
            conn = Connection(os.dup(ours.fileno()))
        weakref.finalize(self, _stop, proc, conn)
        self._proc, self._conn = proc, conn
        self.starts += 1
        try:
            conn.send(self.limits)
            if not conn.poll(START_TIMEOUT_S):
                self.close()
                raise LoaderError(f"the parser process did not start in {START_TIMEOUT_S} s")
            _, enforced = conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise LoaderError(self._died()) from None
        if not enforced:
            log.warning("ingestion.parse_memory_mb is not enforced on this system (no "
                        "RLIMIT_AS): parse_timeout_s still is")
        return conn

    def _died(self) -> str:
        code = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._proc.wait(5)
        self.close()
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}")
        return (f"the parser process stopped ({how}): a crash in the parser, or over the "
                f"memory limit of {self.limits.parse_memory_mb} MB (ingestion.parse_memory_mb)")


def _stop(proc: subprocess.Popen | None, conn: Connection | None) -> None:
    if conn is not None:
        conn.close()
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- the child process ---------------------------------------------------------------------
def main(fd: int) -> None:
    """The parser process: its limits come first over the socket `fd`, then the files."""
    conn = Connection(fd)
    with contextlib.suppress(EOFError):  # the parent went away
        serve(conn, conn.recv())


def serve(conn: Connection, limits: IngestionSettings) -> None:
    """Parse what the parent sends until it hangs up; reply ("ok", doc), ("error",
    message) or ("memory", None) (the process then exits: the parent starts another)."""
    import bs4  # noqa: F401 - the parsers load before the memory limit is measured
    import docx  # noqa: F401
    import pypdf  # noqa: F401

    conn.send(("ready", limit_memory(limits.parse_memory_mb)))
    # the parent's deadline, rounded up, and a grace: an orphan (its parent killed) stops
    alarm = math.ceil(limits.parse_timeout_s) + ORPHAN_GRACE_S
    while True:
        try:
            data, name = conn.recv()
        except EOFError:
            return
        except MemoryError:
            conn.send(("memory", None))
            return
        signal.alarm(alarm)
        try:
            reply: tuple[str, Any] = ("ok", load_document(data, name, limits))
        except LoaderError as e:
            reply = ("error", str(e))
        except MemoryError:
            reply = ("memory", None)
        finally:
            signal.alarm(0)
        del data
        try:
            conn.send(reply)
        except MemoryError:
            reply = ("memory", None)
            conn.send(reply)
        if reply[0] == "memory":
            return


def limit_memory(budget_mb: int) -> bool:
    """Limit this process's address space to what it uses now plus `budget_mb`; False
    where the system has no such limit (not Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = now + budget_mb * MB
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        return False
    return True
