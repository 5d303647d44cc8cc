"""Several users at once on one process: generations take turns in arrival order and say
that they wait, answers are the same as alone, and queries run while an ingest writes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ingest.pipeline import Ingestor, SourceFile, walk
from rag_app.chain import RagAnswer, Waiting
from rag_app.factory import Services
from rag_app.gate import FairGate

DATA = Path(__file__).resolve().parent.parent / "data"


def test_gate_admits_in_arrival_order_and_reports_places() -> None:
    gate = FairGate()
    tickets = [gate.enter() for _ in range(4)]
    assert [gate.wait(t, timeout=0) for t in tickets] == [0, 1, 2, 3]
    order: list[int] = []

    def worker(i: int) -> None:
        assert gate.wait(tickets[i]) == 0
        order.append(i)
        gate.leave(tickets[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in (3, 1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert order == [] and gate.wait(tickets[3], timeout=0) == 3  # all behind ticket 0
    gate.leave(tickets[0])
    for t in threads:
        t.join(timeout=10)
    assert order == [1, 2, 3]
    assert gate.wait(gate.enter(), timeout=0) == 0  # the gate is free again


@pytest.fixture
def shared(demo_index: Services, tmp_path: Path) -> Services:
    """A fresh database holding the demo corpus; the session's embedder and LLM are shared,
    as `st.cache_resource` shares them between browser sessions."""
    s = Services(demo_index.settings.model_copy(update={"db_uri": str(tmp_path / "db")}))
    s.__dict__["embedder"] = demo_index.embedder
    s.__dict__["lm"] = demo_index.lm
    Ingestor(s.embedder, s.store, s.settings.chunking).ingest(walk([DATA]), "default")
    return s


@pytest.mark.slow
def test_concurrent_askers_queue_fairly_while_an_ingest_runs(shared: Services,
                                                             demo_questions) -> None:
    questions = [q["question"] for q in demo_questions[:3]]
    options = {"max_new_tokens": 12}
    alone = {q: shared.chain().answer(q, **options).answer for q in questions}

    def ask(q: str) -> tuple[RagAnswer, int]:
        waits = 0
        final = None
        for event in shared.chain().stream_events(q, **options):
            waits += isinstance(event, Waiting)
            final = event
        assert isinstance(final, RagAnswer)
        return final, waits

    extra = [SourceFile(f"upload/extra{i}.md", lambda i=i: (
        f"# Extra {i}\n\n" + f"Extra note {i} about harbour lanterns. " * 80).encode())
        for i in range(24)]
    with ThreadPoolExecutor(4) as pool:
        ingest = pool.submit(Ingestor(shared.embedder, shared.store,
                                      shared.settings.chunking).ingest, extra, "default")
        answers = list(pool.map(ask, questions))
        report = ingest.result(timeout=600)

    assert [a.answer for a, _ in answers] == [alone[q] for q in questions]  # no interference
    assert sum(w > 0 for _, w in answers) >= 1  # somebody was told to wait
    assert all(a.timings["queue_ms"] > 0 for a, w in answers if w)
    assert report.to_json()["ingested"] == 24 and not report.failed
    docs = {d["source"]: d["chunks"] for d in shared.store.documents("default")}
    assert len(docs) == 8 + 24
    ids = shared.store.db.open_table("default").to_arrow()["id"].to_pylist()
    assert len(ids) == len(set(ids)) == sum(docs.values())  # nothing lost or duplicated
