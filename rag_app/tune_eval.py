"""`rag tune --eval`: answer metrics of the base model and of the tuned adapter."""

from __future__ import annotations

from pathlib import Path

from rag_app.settings import Settings


def compare_answers(settings: Settings, adapter: Path, dataset_dir: Path, limit: int) -> str:
    """`rag eval --answers` on the first `limit` questions, base model then adapter."""
    from rag_app.evaluation import run_eval
    from rag_app.factory import Services

    lines = []
    for name, value in (("base", None), ("adapter", str(adapter))):
        s = settings.model_copy(update={"llm": settings.llm.model_copy(
            update={"adapter": value})})
        out = run_eval(Services(s), dataset_dir, limit, s.retrieval.mode, s.retrieval.k,
                       answer=True)
        a = out["answers"] or {}
        lines.append(f"{name:<8} " + ", ".join(
            f"{k} {a[k]:.3f}" for k in ("exact_match", "f1", "cited_contains_gold",
                                        "supported_contains_gold", "not_found") if k in a))
    return "\n".join(lines)
