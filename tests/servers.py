"""Real servers for the tests: a process listening on a free loopback port, started and
stopped by a module fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from rag_app import child_server
from rag_app.child_server import free_port, stop
from rag_app.errors import ModelServerError

__all__ = ["RAG", "ROOT", "clean_env", "free_port", "start", "stop"]

RAG = str(Path(sys.executable).with_name("rag"))
ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """This environment without RAG_* settings, importing this checkout's packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                             env.get("PYTHONPATH")]))}


def start(env: dict[str, str], log: Path, command: Sequence[str] = (RAG, "serve", "--port"),
          ready: str = "/health") -> tuple[subprocess.Popen, str]:
    """Run `command` + a free port; return it once GET `ready` answers 200."""
    try:
        return child_server.start(command, env, log, ready)
    except ModelServerError as e:
        pytest.fail(str(e))
