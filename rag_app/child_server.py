"""A server run as a child process on a free loopback port: `rag serve` for the tests and
benchmarks, or any other command that takes its port last (llama.cpp's server)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from rag_app.errors import ModelServerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: Sequence[str], env: dict[str, str], log: Path, ready: str = "/health",
          timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """Run `command` + a free port, its output in `log`; return it and its URL once GET
    `ready` answers 200. A bound on start-up (not a measurement): a server that exits or
    does not answer within `timeout_s` is stopped and reported with its log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([*command, str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ModelServerError(f"{command[0]} exited with {proc.returncode}:\n"
                                   f"{log.read_text()}")
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    stop(proc)
    raise ModelServerError(f"{command[0]} did not answer {ready} in {timeout_s:.0f} s:\n"
                           f"{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
