"""Real servers for the tests: a process listening on a free loopback port, started and
stopped by a module fixture."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

RAG = str(Path(sys.executable).with_name("rag"))
ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """This environment without RAG_* settings, importing this checkout's packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                             env.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict[str, str], log: Path, command: Sequence[str] = (RAG, "serve", "--port"),
          ready: str = "/health") -> tuple[subprocess.Popen, str]:
    """Run `command` + a free port; return it once GET `ready` answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([*command, str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    deadline = time.monotonic() + 300  # a generous bound on start-up, not a measurement
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{command[0]} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"{command[0]} did not answer {ready}:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
