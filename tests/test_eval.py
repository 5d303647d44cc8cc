"""`rag eval` on a tiny hand-written BEIR folder, with the real embedder and LanceDB."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rag_app import eval_cli
from rag_app.evaluation import collection_name, dataset_name, load_dataset, run_eval
from rag_app.factory import Services

LONG = " ".join(
    f"Sentence {i}: the Eiffel Tower in Paris was completed in 1889 for the World's Fair and "
    "is made of wrought iron." for i in range(30))  # several chunks for one passage
CORPUS = [
    {"_id": "eiffel", "title": "Eiffel Tower", "text": LONG},
    {"_id": "bread", "title": "Sourdough", "text": "Sourdough bread is leavened by a starter "
     "of wild yeast and lactic acid bacteria."},
    {"_id": "volcano", "title": "Mount Etna", "text": "Mount Etna is an active volcano on "
     "the east coast of Sicily."},
    {"_id": "chess", "title": "Chess", "text": "In chess, castling moves the king two squares "
     "towards a rook."},
    {"_id": "bees", "title": "Honey bees", "text": "Honey bees communicate the direction of "
     "flowers with a waggle dance."},
    {"_id": "empty", "title": "", "text": "   "},  # cannot be ingested, must not break caching
]
QUERIES = [
    {"_id": "q1", "text": "When was the Eiffel Tower in Paris completed?", "answers": ["1889"]},
    {"_id": "q0", "text": "A query without judgements", "answers": ["none"]},
    {"_id": "q2", "text": "How do honey bees tell each other where flowers are?",
     "answers": ["waggle dance", "with a waggle dance"]},
    {"_id": "q3", "text": "Which volcano is on Sicily?", "answers": ["Mount Etna"]},
    {"_id": "q4", "text": "Who painted the Mona Lisa?", "answers": [], "answerable": False},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\teiffel\t1\nq2\tbees\t1\nq2\tchess\t0\nq3\tvolcano\t2\n"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    d = tmp_path / "tiny" / "subset"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    (d / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    (d / "qrels" / "test.tsv").write_text(QRELS)
    return d


@pytest.fixture
def eval_services(services: Services, tmp_path: Path) -> Services:
    """A fresh database, with the session's embedder (loaded once)."""
    s = Services(services.settings.model_copy(update={"db_uri": str(tmp_path / "db")}))
    s.__dict__["embedder"] = services.embedder
    return s


def test_load_dataset_reads_the_beir_layout(dataset: Path) -> None:
    ds = load_dataset(dataset)
    assert len(ds.corpus) == 6 and ds.corpus["bread"][0] == "Sourdough"
    assert [q["_id"] for q in ds.queries] == ["q1", "q0", "q2", "q3", "q4"]
    assert ds.qrels == {"q1": {"eiffel": 1}, "q2": {"bees": 1, "chess": 0}, "q3": {"volcano": 2}}
    assert dataset_name(dataset) == "subset"
    (dataset.parent / "corpus.jsonl").write_text("")  # a parent dataset names its subsets
    assert dataset_name(dataset) == "tiny_subset"


def test_run_eval_scores_retrieval_and_caches_the_index(dataset: Path,
                                                        eval_services: Services) -> None:
    out = run_eval(eval_services, dataset, None, "vector", 3, answer=False)
    assert out["dataset"] == "subset" and out["mode"] == "vector" and out["queries"] == 3
    assert out["collection"] == collection_name("subset", eval_services)
    assert out["collection"].startswith("eval_subset_") and len(out["collection"]) == 20
    assert out["answers"] is None and out["ingest_failed"] == 0  # the empty one is skipped
    assert set(out["retrieval"]) == {"ndcg@10", "recall@1", "recall@5", "recall@10", "mrr@10",
                                     "hit@1", "hit@4"}
    assert set(out["ranks"]) == {"q1", "q2", "q3"}
    assert all(0.0 <= v <= 1.0 for v in out["retrieval"].values())
    assert out["retrieval"]["recall@5"] == 1.0  # 5 passages: every relevant one is found
    t = out["timings"]
    assert not t["ingest_cached"] and t["ingest_s"] > 0 and t["retrieval_ms_p50"] > 0
    assert t["answer_s_mean"] is None
    # The long passage is several chunks, stored under one source per passage.
    docs = {d["source"]: d["chunks"] for d in eval_services.store.documents(out["collection"])}
    assert len(docs) == 5 and docs["eiffel.txt"] > 1

    for mode in ("fulltext", "hybrid"):
        # limit=1: only the first judged query, an easy one whose passage must rank first
        again = run_eval(eval_services, dataset, 1, mode, 3, answer=False)
        assert again["timings"]["ingest_cached"] and again["timings"]["ingest_s"] == 0.0
        assert again["queries"] == 1
        assert again["retrieval"] == {"ndcg@10": 1.0, "recall@1": 1.0, "recall@5": 1.0,
                                      "recall@10": 1.0, "mrr@10": 1.0, "hit@1": 1.0,
                                      "hit@4": 1.0}
        assert again["ranks"] == {"q1": 1}
    assert json.loads(json.dumps(out)) == out


def test_a_rebuilt_corpus_is_ingested_again_not_read_from_the_cache(
        dataset: Path, eval_services: Services) -> None:
    first = run_eval(eval_services, dataset, None, "fulltext", 3, answer=False)
    rows = [json.loads(line) for line in (dataset / "corpus.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["_id"] != "chess"]  # a passage gone
    for r in rows:
        if r["_id"] == "volcano":  # a passage changed: its old words must not be found
            r["text"] = "Stromboli is an active volcano in the Aeolian Islands."
    (dataset / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = run_eval(eval_services, dataset, None, "fulltext", 3, answer=False)
    assert not again["timings"]["ingest_cached"]
    sources = {d["source"] for d in eval_services.store.documents(first["collection"])}
    assert "chess.txt" not in sources and "volcano.txt" in sources
    found = [d.page_content for d in eval_services.retriever(first["collection"]).invoke(
        "volcano", k=5, mode="fulltext", min_similarity=-1.0)]
    assert any("Stromboli" in t for t in found) and not any("Sicily" in t for t in found)
    assert run_eval(eval_services, dataset, None, "fulltext", 3,
                    answer=False)["timings"]["ingest_cached"]


def test_run_eval_refuses_bad_input(dataset: Path, eval_services: Services,
                                    tmp_path: Path) -> None:
    from rag_app.errors import RagError, SettingsError

    with pytest.raises(SettingsError, match="retrieval.mode"):
        run_eval(eval_services, dataset, None, "semantic", 3, answer=False)
    with pytest.raises(RagError, match="missing qrels/test.tsv"):
        (dataset / "qrels" / "test.tsv").unlink()
        run_eval(eval_services, dataset, None, "vector", 3, answer=False)
    with pytest.raises(RagError, match="no such dataset folder"):
        run_eval(eval_services, tmp_path / "nope", None, "vector", 3, answer=False)


def _cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_cli.eval_command)
    return app


def test_eval_command_json_and_errors(dataset: Path, services: Services, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def shared_embedder(settings):  # noqa: ANN001, ANN202
        s = Services(settings)
        s.__dict__["embedder"] = services.embedder
        return s

    monkeypatch.setattr(eval_cli, "Services", shared_embedder)
    monkeypatch.setenv("RAG_DB_URI", str(tmp_path / "clidb"))
    runner = CliRunner()
    r = runner.invoke(_cli_app(), [str(dataset), "--mode", "fulltext", "--limit", "2",
                                   "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["mode"] == "fulltext" and out["queries"] == 2 and out["answers"] is None

    r = runner.invoke(_cli_app(), [str(dataset), "--limit", "1"])
    assert r.exit_code == 0, r.output
    assert "nDCG@10" not in r.stdout and "ndcg@10" in r.stdout and "cached" in r.stdout

    r = runner.invoke(_cli_app(), [str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such dataset folder" in r.stderr
    r = runner.invoke(_cli_app(), [str(dataset), "--mode", "semantic"])
    assert r.exit_code == 2 and "retrieval.mode" in r.stderr


@pytest.mark.slow
def test_run_eval_with_answers(dataset: Path, services: Services,
                               eval_services: Services) -> None:
    eval_services.__dict__["lm"] = services.lm  # the session's LLM, loaded once
    out = run_eval(eval_services, dataset, 2, "hybrid", 2, answer=True)
    a = out["answers"]
    assert a is not None and a["questions"] == 2 and 0 <= a["answered"] <= 2
    assert all(0.0 <= a[key] <= 1.0 for key in
               ("exact_match", "f1", "cited_contains_gold", "not_found", "contains_gold",
                "false_refusals", "refusal"))
    assert a["unanswerable"] == 1 and len(out["details"]) == 3  # the unanswerable one too
    assert a["seconds_per_question"] > 0
    assert out["timings"]["answer_s_mean"] > 0
