"""The `rag` command: parse, call the library, print text or --json. Thin by design."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rag_app.citations import page_reference
from rag_app.errors import RagError
from rag_app.eval_cli import eval_command
from rag_app.factory import Services
from rag_app.settings import MAX_PAGE, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Ask questions about your documents with a local GPT.")
state: dict[str, Any] = {}

CollectionOpt = Annotated[Optional[str], typer.Option("--collection", "-c",  # noqa: UP045
                                                      help="Collection (default: setting).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
KOpt = Annotated[Optional[int], typer.Option("--k", help="Passages to retrieve.")]  # noqa: UP045
ModeOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--mode", help="vector | fulltext | hybrid")]
SourceOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--source", help="Only passages of this document (as `rag docs` lists it).")]
PageOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--page", min=1, max=MAX_PAGE, help="Only passages of this page (PDF documents).")]
MmrOpt = Annotated[Optional[bool], typer.Option(  # noqa: UP045
    "--mmr/--no-mmr", help="Diversify passages with maximal marginal relevance.")]
RerankOpt = Annotated[Optional[bool], typer.Option(  # noqa: UP045
    "--rerank/--no-rerank", help="Rescore candidates with retrieval.rerank_model.")]


@app.callback()
def main(
    config: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--config", help="TOML or YAML settings file (env RAG_* still wins).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    state["config"] = config


def _settings(**overrides: Any) -> Settings:
    return load_settings(state.get("config"), **{k: v for k, v in overrides.items() if v})


def _fail(e: RagError) -> typer.Exit:
    _secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(e.exit_code)


# Terminal control (C0/C1 controls but newline and tab; ESC starts the sequences that set a
# title or clear the screen) and bidirectional overrides (`quokka\u202edm.exe.txt` shows as
# `quokkatxt.exe.md`): text from documents and file names is printed with them escaped.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                     "\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` with every control or direction-changing character shown as `\\uXXXX`."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _echo(message: str = "", **kwargs: Any) -> None:
    typer.echo(terminal_safe(str(message)), **kwargs)


def _secho(message: str = "", **kwargs: Any) -> None:
    typer.secho(terminal_safe(str(message)), **kwargs)


def _print_json(obj: Any) -> None:
    _echo(json.dumps(obj, ensure_ascii=False, default=str))


def _source(source: str | None) -> str | None:
    """A document as the user names it: a path that exists means its absolute path."""
    if source is None:
        return None
    return str(Path(source).resolve()) if Path(source).exists() else source


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files, folders or .zip archives.")],
    collection: CollectionOpt = None,
    glob: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--glob", help="Only files whose path inside a folder matches, e.g. '*.md'.")] = None,
    sync: Annotated[bool, typer.Option(
        "--sync", help="Also remove stored documents under PATHS whose files are gone.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="With --sync: list what it would remove, and why; ingest and remove "
        "nothing.")] = False,
    engine: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--engine", help="local | ray: parse, chunk and embed here or on a Ray cluster "
        "(default: setting ingestion.engine).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Load, chunk, embed and store files (unchanged files are skipped)."""
    try:
        settings = _settings(collection=collection,
                             ingestion={"engine": engine} if engine else None)
        from ingest.pipeline import walk
        from ingest.progress import IngestProgress

        if dry_run and not sync:
            raise typer.BadParameter("it shows what --sync would remove: give both",
                                     param_hint="--dry-run")
        ingestor = Services(settings).ingestor()
        files = list(walk(paths, glob, max_depth=settings.ingestion.max_depth,
                          outside_links=settings.ingestion.outside_links))
        # a missing root proves nothing gone: it may be unmounted or renamed
        prefixes = [str(p.resolve()) for p in paths if p.exists()] if sync else []
        if dry_run:
            gone = ingestor.sync_plan(files, settings.collection, prefixes, glob)
            if as_json:
                _print_json({"would_remove": gone, "reason": "file gone"})
            else:
                for source in gone:
                    _echo(f"would remove {source}: its file is gone")
                _echo(f"{len(gone)} would be removed from collection {settings.collection!r}; "
                      "nothing was changed")
            return
        # a bar by bytes on stderr, or under --json JSON lines there (per file, every 5 s)
        with IngestProgress(files, sys.stderr, as_json) as progress:
            report = ingestor.ingest(
                files, settings.collection, progress,
                sync_prefixes=prefixes, sync_glob=glob)
    except RagError as e:
        raise _fail(e) from None
    out = report.to_json()
    if as_json:
        _print_json(out)
    else:
        skipped = f", {len(out['skipped'])} skipped" if out["skipped"] else ""
        _echo(f"{out['ingested']} ingested ({out['chunks']} chunks), "
              f"{out['unchanged']} unchanged, {len(out['removed'])} removed, "
              f"{len(out['failed'])} failed{skipped} "
              f"-> collection {settings.collection!r} at {settings.db_uri}")
        for f in out["skipped"]:
            _secho(f"  skipped: {f['path']}: {f['reason']}", fg=typer.colors.YELLOW, err=True)
        for f in out["failed"]:
            _secho(f"  failed: {f['path']}: {f['error']}", fg=typer.colors.RED, err=True)
    if out["failed"]:
        raise typer.Exit(1)


@app.command()
def search(
    query: Annotated[str, typer.Argument()],
    k: KOpt = None,
    mode: ModeOpt = None,
    source: SourceOpt = None,
    page: PageOpt = None,
    mmr: MmrOpt = None,
    rerank: RerankOpt = None,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the retrieved passages with scores (no generation)."""
    from rag_app.chain import source_json

    options = {"k": k, "mode": mode, "source": _source(source), "page": page, "mmr": mmr,
               "rerank": rerank}
    try:
        settings = _settings(collection=collection)
        if settings.serve.url:  # the running server searches
            from rag_app.remote import RemoteRag

            hits = RemoteRag(settings).search(query, **options)
        else:
            docs = Services(settings).retriever().invoke(query, **options)
            hits = [source_json(n, d) for n, d in enumerate(docs, 1)]
    except RagError as e:
        raise _fail(e) from None
    if as_json:
        _print_json({"query": query, "hits": hits})
        return
    if not hits:
        _echo("No passage is relevant enough.")
    for h in hits:
        page = _page(h)
        _secho(f"[{h['n']}] {h['source']}{page}  score={h['score']:.3f}", bold=True)
        _echo(h["text"].strip() + "\n")


@app.command()
def ask(
    question: Annotated[str, typer.Argument()],
    k: KOpt = None,
    mode: ModeOpt = None,
    source: SourceOpt = None,
    page: PageOpt = None,
    mmr: MmrOpt = None,
    rerank: RerankOpt = None,
    collection: CollectionOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
    sample: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--sample/--greedy", help="Sample instead of greedy decoding.")] = None,
    temperature: Annotated[Optional[float], typer.Option()] = None,  # noqa: UP045
    top_k: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
    top_p: Annotated[Optional[float], typer.Option()] = None,  # noqa: UP045
    num_beams: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
    as_json: JsonOpt = False,
) -> None:
    """Answer a question from your documents, with numbered sources."""
    options = {"k": k, "mode": mode, "source": _source(source), "page": page, "mmr": mmr,
               "rerank": rerank,
               "max_new_tokens": max_new_tokens, "do_sample": sample,
               "temperature": temperature, "top_k": top_k, "top_p": top_p,
               "num_beams": num_beams, "seed": seed}
    try:
        settings = _settings(collection=collection)
        if (num_beams or 1) > 1 and not as_json:
            _secho("beam search is not streamed: the answer appears when it is done",
                        dim=True, err=True)
        out, streamed = None, []
        for event in _answer(settings, question, options):
            if isinstance(event, dict):
                out = event
            elif not as_json:
                streamed.append(event)
                _echo(event, nl=False)
    except RagError as e:
        raise _fail(e) from None
    assert out is not None
    if as_json:
        _print_json(out)
        return
    _echo("")
    if out["answer"] != "".join(streamed).strip():  # cited, or refused, after the copy
        _echo(f"-> {out['answer']}")
    if out["refusal"]:
        _secho(f"(why: {out['refusal']})", dim=True, err=True)
    for s in out["sources"]:
        mark = "*" if s["n"] in out["cited"] else "~" if s["n"] in out["matched"] else " "
        _echo(f"{mark}[{s['n']}] {s['source']}{_page(s)}  score={s['score']:.3f}")
    t = out["timings"]
    _secho(f"{out['model']} on {out['device']}: retrieve {t['retrieve_ms']:.0f} ms, "
                f"first token {t['first_token_ms']:.0f} ms, {t['tokens_per_s']:.1f} tok/s",
                dim=True, err=True)


def _page(source: dict[str, Any]) -> str:
    """ " p. 25 (PDF page 29)": the printed page beside the physical one where they differ."""
    ref = page_reference(source.get("page"), source.get("page_label"))
    return f" {ref}" if ref else ""


def _answer(settings: Settings, question: str, options: dict[str, Any]
            ) -> Iterator[str | dict[str, Any]]:
    """The answer's text pieces, then the answer as `--json` prints it: from the server at
    serve.url when it is set, else from the models loaded here."""
    if settings.serve.url:
        from rag_app.remote import RemoteRag

        yield from RemoteRag(settings).ask(question, **options)
        return
    from rag_app.chain import RagAnswer

    for event in Services(settings).chain().stream_events(question, **options):
        if isinstance(event, RagAnswer):
            yield event.to_json()
        elif isinstance(event, str):
            yield event


@app.command()
def docs(collection: CollectionOpt = None, as_json: JsonOpt = False) -> None:
    """List the documents of a collection with their chunk counts."""
    try:
        settings = _settings(collection=collection)
        rows = Services(settings).store.documents(settings.collection)
    except RagError as e:
        raise _fail(e) from None
    if as_json:
        _print_json({"collection": settings.collection, "documents": rows})
        return
    for r in rows:
        _echo(f"{r['chunks']:5d} chunks  {r['source']}")


@app.command()
def delete(sources: Annotated[list[str], typer.Argument(help="Sources as `rag docs` lists them.")],
           collection: CollectionOpt = None) -> None:
    """Remove documents (all their chunks) from a collection."""
    try:
        settings = _settings(collection=collection)
        resolved = [_source(s) for s in sources]
        n = Services(settings).store.delete_documents(settings.collection, resolved)
    except RagError as e:
        raise _fail(e) from None
    _echo(f"deleted {n} chunks")
    if n == 0:
        raise typer.Exit(1)


@app.command()
def ui(port: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
       host: Annotated[Optional[str], typer.Option(  # noqa: UP045
           help="Address to listen on (default ui.host, 127.0.0.1). Any other than "
           "loopback needs ui.password.")] = None) -> None:
    """Start the Streamlit app (on this machine only, unless --host and ui.password say
    otherwise)."""
    try:
        given = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        settings = _settings(ui=given)
    except RagError as e:
        raise _fail(e) from None
    spec = importlib.util.find_spec("ui")
    assert spec is not None and spec.origin is not None
    script = Path(spec.origin).parent / "app.py"
    u = settings.ui
    # browser.serverAddress set: Streamlit prints that one URL and never looks up the
    # machine's external address (a request that would leave the machine).
    shown = "localhost" if u.host in ("0.0.0.0", "::") else u.host  # noqa: S104
    cmd = [sys.executable, "-m", "streamlit", "run", str(script),
           "--server.address", u.host, "--server.port", str(u.port),
           "--browser.serverAddress", shown, "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
           "--client.showErrorDetails", "none", "--server.enableXsrfProtection", "true",
           "--server.maxUploadSize", str(u.max_upload_mb)]
    if state.get("config"):
        cmd += ["--", "--config", str(state["config"])]
    # The app's own settings see the same address (its Host check; never the password,
    # which stays in the environment or the config file, out of the process list).
    os.environ["RAG_UI__HOST"], os.environ["RAG_UI__PORT"] = u.host, str(u.port)
    sys.stdout.flush()
    # `rag ui` becomes the server, so a signal to it (Ctrl-C, a service manager's SIGTERM)
    # reaches the server itself: a child process would outlive a terminated parent.
    os.execv(sys.executable, cmd)


@app.command()
def serve(port: Annotated[Optional[int], typer.Option()] = None,  # noqa: UP045
          host: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="Address to listen on (default serve.host, 127.0.0.1). Any other than "
              "loopback needs serve.token.")] = None) -> None:
    """Serve the HTTP API: OpenAI-compatible chat completions answered from your documents,
    search, documents (on this machine only, unless --host and serve.token say otherwise)."""
    try:
        given = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        settings = _settings(serve=given)
    except RagError as e:
        raise _fail(e) from None
    from rag_app.server import run

    run(settings)


app.command("eval")(eval_command)


@app.command()
def tune(
    out: Annotated[Path, typer.Argument(help="Output folder: the adapter, checkpoint, report.")],
    data: Annotated[Path, typer.Option(
        "--data", help="qa-pool folder (questions.jsonl + contexts.jsonl).")],
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 300,
    max_minutes: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--max-minutes", help="Stop (and save) once training has run this long.")] = None,
    until: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--until", min=1, help="Stop (and save) after this step, keeping the learning-rate "
        "schedule of --steps.")] = None,
    examples: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--examples", min=1, help="Distinct training questions (default: all).")] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last checkpoint.")]
    = False,
    accumulate: Annotated[int, typer.Option("--accumulate", min=1,
                                            help="Examples per optimizer step.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-4,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=64,
                                            help="Longest example, in tokens.")] = 512,
    words: Annotated[tuple[int, int], typer.Option(
        "--words", help="Passage window, shortest and longest, in words.")] = (60, 90),
    distractors: Annotated[tuple[int, int], typer.Option(
        "--distractors", help="Passages without the answer an example shows, fewest and "
        "most (the gold passage comes on top).")] = (2, 3),
    val_examples: Annotated[int, typer.Option("--val-examples", min=0,
                                              help="Held-out examples.")] = 200,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1)] = 10,
    max_mb: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--max-mb", min=0.1, help="Shrink the saved adapter to this many MB (bfloat16, "
        "each update's truncated SVD).")] = None,
    eval_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--eval", help="Also answer this BEIR QA set with the base model and the adapter.")]
    = None,
    eval_limit: Annotated[int, typer.Option("--eval-limit", min=1)] = 50,
) -> None:
    """Fine-tune a LoRA adapter of llm.model to answer from numbered sources with [n]."""
    from rag_app.tune import TuneOptions, format_tune_report
    from rag_app.tune import tune as run_tune
    from rag_app.tune_eval import compare_answers

    opts = TuneOptions(data, out, steps=steps, max_minutes=max_minutes, until=until,
                       examples=examples,
                       threads=threads, seed=seed, resume=resume, accumulate=accumulate,
                       lr=lr, max_tokens=max_tokens, words=tuple(words),
                       distractors=tuple(distractors),
                       val_examples=val_examples, checkpoint_every=checkpoint_every,
                       max_mb=max_mb)
    try:
        settings = _settings()
        report = run_tune(settings, opts)
        _echo(format_tune_report(report))
        if eval_dir is not None and not report.interrupted:
            _echo(compare_answers(settings, out, eval_dir, eval_limit))
    except RagError as e:
        raise _fail(e) from None
    if report.interrupted:
        raise typer.Exit(130)

if __name__ == "__main__":
    app()
