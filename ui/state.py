"""Session and resource helpers: the only place the UI touches st.session_state / caches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import streamlit as st

# Import the heavy modules here, once: `ui.state` is the first project import of every
# session (app.py), and Python's per-module import lock makes a second session wait for it.
# Pages imported concurrently by two sessions otherwise race inside transformers' lazy
# imports ("cannot import name 'AutoConfig'").
import ingest.pipeline  # noqa: F401
import rag_app.chain  # noqa: F401
import rag_app.lab  # noqa: F401
from rag_app.errors import RagError
from rag_app.factory import Services
from rag_app.settings import Settings, load_settings


def _config_file() -> Path | None:
    """`rag ui --config FILE` passes it to the script after `--`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path)
    return parser.parse_known_args(sys.argv[1:])[0].config


@st.cache_resource(show_spinner=False)
def _services(settings_json: str, _settings: Settings) -> Services:
    """One Services (one embedder, one LLM) per process and settings, shared by sessions.
    Keyed by the settings' JSON, built from the settings themselves: the JSON hides the
    secrets (llm.api_key), and a round trip through it would lose which options were set."""
    return Services(_settings)


def settings() -> Settings:
    """This process's settings (env and `--config`); an invalid one stops the page."""
    try:
        return load_settings(_config_file())
    except RagError as e:
        st.error(str(e))
        st.stop()


def services() -> Services:
    current = settings()
    return _services(current.model_dump_json(), current)


def messages() -> list[dict[str, Any]]:
    """Chat history of this browser session: {"role", "content", "answer"?}."""
    return st.session_state.setdefault("messages", [])


def clear_messages() -> None:
    st.session_state["messages"] = []


def options() -> dict[str, Any]:
    """Per-request retrieval and decoding options chosen in the sidebar."""
    return st.session_state.setdefault("options", {})


def collection(default: str) -> str:
    return st.session_state.get("collection") or default


def show_confidence() -> bool:
    return bool(st.session_state.get("show_confidence"))
