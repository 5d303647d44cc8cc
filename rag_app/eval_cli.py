"""`rag eval DATASET_DIR`: retrieval (and answer) metrics on a BEIR-style folder.

Registered in `rag_app.cli` with `app.command("eval")(eval_command)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rag_app.errors import RagError
from rag_app.factory import Services
from rag_app.settings import load_settings


def _config_file() -> Path | None:
    """The `rag --config` file when run under the `rag` app (looked up, not imported, so
    this module never imports the CLI module that registers it)."""
    cli = sys.modules.get("rag_app.cli")
    state = getattr(cli, "state", None) or {}
    return state.get("config")


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(out: dict[str, Any]) -> str:
    t, r = out["timings"], out["retrieval"]
    ingest = "cached" if t["ingest_cached"] else f"{t['ingest_s']:.1f} s"
    lines = [
        f"dataset {out['dataset']}: {out['passages']} passages, {out['queries']} queries, "
        f"mode {out['mode']}",
        f"collection {out['collection']} (ingest {ingest})",
        "",
        *(["retrieval (passage level)", *(f"  {name:<12}{value:.3f}" for name, value in
                                           r.items())] if r else
          ["retrieval: no query has a relevant passage"]),
    ]
    a = out["answers"]
    if a is not None:
        lines += [
            "",
            f"answers (k={out['k']}, {a['questions']} questions, {a['answered']} answered)",
            f"  {'exact_match':<26}{a['exact_match']:.3f}",
            f"  {'f1':<26}{a['f1']:.3f}",
            f"  {'cited_contains_gold':<26}{a['cited_contains_gold']:.3f}  (of answered)",
            f"  {'supported_contains_gold':<26}{a['supported_contains_gold']:.3f}  "
            "(cited or matched, of answered)",
            f"  {'contains_gold':<26}{a['contains_gold']:.3f}  (the answer text)",
            f"  {'false_refusals':<26}{a['false_refusals']:.3f}  (answerable, not found)",
        ]
        if a["refusal"] is not None:
            lines.append(f"  {'refusal':<26}{a['refusal']:.3f}  "
                         f"(of {a['unanswerable']} unanswerable questions)")
    lines += [
        "",
        f"timings: ingest {ingest}, retrieval p50 {_fmt(t['retrieval_ms_p50'], '.1f')} ms/query"
        + (f", answer mean {_fmt(t['answer_s_mean'], '.1f')} s/question"
           if t["answer_s_mean"] is not None else ""),
    ]
    if out.get("ingest_failed"):
        lines.append(f"warning: {out['ingest_failed']} passages failed to ingest")
    return "\n".join(lines)


def eval_command(
    dataset_dir: Annotated[Path, typer.Argument(
        help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv.")],
    limit: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--limit", min=1, help="Evaluate the first N queries that have qrels.")] = None,
    mode: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--mode", help="vector | fulltext | hybrid (default: setting).")] = None,
    k: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--k", help="Passages given to the model when answering.")] = None,
    answers: Annotated[bool, typer.Option(
        "--answers/--no-answers", help="QA sets: also generate answers (slow).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Score retrieval (nDCG@10, recall@1/5/10, MRR@10) and, with --answers on QA sets,
    answers (exact match, token F1, cited sources holding the answer, "not found" share)."""
    retrieval = {key: v for key, v in {"mode": mode, "k": k}.items() if v is not None}
    try:
        settings = load_settings(_config_file(),
                                 **({"retrieval": retrieval} if retrieval else {}))
        services = Services(settings)
        from rag_app.evaluation import run_eval

        bar = None
        if not as_json:
            from tqdm import tqdm

            bar = tqdm(unit="passage", desc="ingest", file=sys.stderr, leave=False)
        try:
            out = run_eval(services, dataset_dir, limit, settings.retrieval.mode,
                           settings.retrieval.k, answers,
                           progress=(lambda _: bar.update()) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    except RagError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(e.exit_code) from None
    if as_json:
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        typer.echo(format_report(out))
