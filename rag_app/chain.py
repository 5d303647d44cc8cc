"""The retrieval chain, composed of LangChain runnables:

    {"question", options} -> +docs (retriever) -> +messages (prompt) -> +answer (chat model)

`.stream()` yields the sources before the first answer token. `RagChain.answer()` and
`RagChain.stream_events()` add citations and timings on top.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from langchain_core.documents import Document
from langchain_core.messages import AIMessageChunk
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnablePassthrough

from rag_app.chat_model import LocalChatModel, generation_options, model_metadata
from rag_app.citations import match_sources
from rag_app.grounded import (
    Grounding,
    Span,
    evidence,
    focus_sentences,
    locate_span,
    strip_end,
    support,
    to_sentence_end,
    with_expansion,
)
from rag_app.prompt import (
    NOT_FOUND,
    asks_two_things,
    build_messages,
    condense_question,
    fit_sources,
    is_follow_up,
    parse_citations,
)
from rag_app.retriever import LanceRetriever
from rag_app.settings import CitationSettings, GenerationSettings

if TYPE_CHECKING:
    from rag_app.remote_llm import RemoteChatModel

    ChatModel = LocalChatModel | RemoteChatModel

RETRIEVAL_KEYS = ("k", "mode", "min_similarity", "mmr", "mmr_lambda", "fetch_k", "rerank",
                  "source", "page", "collection")
QUEUE_KEY = "queue_ahead"  # on the empty chunks sent while waiting for the model
QUEUE_MS_KEY = "queue_ms"  # on the empty chunk sent once the model is this request's


@dataclass
class Waiting:
    """A `stream_events` event: the model is busy with `ahead` earlier requests."""

    ahead: int


# Why an answer is "not found" (RagAnswer.refusal)
NO_PASSAGE = "no passage of your documents is relevant enough to the question"
NO_ANSWER = "the model found no answer in the passages"
LOW_CONFIDENCE = "the passage the model copied from is an unlikely answer"
UNSUPPORTED = "the sentences the model copied from are not about what the question asks"
NO_EVIDENCE = "no sentence of the passages holds most of what the question asks about"
FOLLOWS_NOT_FOUND = "it follows a question whose answer is not in your documents"


@dataclass(frozen=True)
class Turn:
    """An earlier question of the conversation: the query searched, and whether it was
    answered (a follow-up of an unanswered question cannot be answered either)."""

    query: str
    found: bool = True


@dataclass
class RagAnswer:
    question: str
    query: str  # the standalone query actually searched (differs for follow-ups)
    answer: str
    sources: list[Document]
    cited: list[int]  # the [n] the model wrote
    found: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    matched: list[int] = field(default_factory=list)  # uncited sentences' sources, by the app
    spans: list[Span] = field(default_factory=list)  # grounded: what was copied, from where
    refusal: str | None = None  # why the answer is "not found" (None: it was found)
    confidence: float | None = None  # grounded: the copied span's mean token probability

    def to_json(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "question": self.question, "query": self.query, "answer": self.answer,
            "found": self.found, "refusal": self.refusal, "confidence": self.confidence,
            "spans": [{"n": s.n, "start": s.start, "end": s.end, "text": s.text}
                      for s in self.spans],
            "sources": [source_json(n, d) for n, d in enumerate(self.sources, 1)],
            "cited": self.cited, "matched": self.matched, "model": meta.get("model_name"),
            "adapter": meta.get("adapter"),
            "device": meta.get("device"),
            "dtype": meta.get("dtype"), "engine": meta.get("engine"), "timings": self.timings,
            "tokens": [{"text": t["text"], "prob": t["prob"]} for t in meta.get("tokens", [])],
            "mean_logprob": meta.get("mean_logprob"),
        }


def source_json(n: int, doc: Document) -> dict[str, Any]:
    m = doc.metadata
    return {"n": n, "source": m.get("source"), "page": m.get("page"),
            "page_label": m.get("page_label"), "text": doc.page_content,
            "score": m.get("score"), "similarity": m.get("similarity"),
            "heading": m.get("heading"), "title": m.get("title"),
            "chunk_index": m.get("chunk_index"), "page_end": m.get("page_end"),
            "doc_hash": m.get("doc_hash")}


class RagChain:
    """Retriever + prompt + chat model, with the prompt fitted to the model's context."""

    def __init__(self, retriever: LanceRetriever, chat_model: Callable[[], ChatModel],
                 generation: GenerationSettings, citations: CitationSettings,
                 model_name: str = "") -> None:
        """`chat_model` is called on first need: a question that retrieves nothing, or an
        empty collection, never loads the LLM."""
        self.retriever = retriever
        self._chat_model = chat_model
        self.generation = generation
        self.model_name = model_name
        self.citations = citations
        self.runnable: Runnable = (
            RunnablePassthrough.assign(query=RunnableLambda(_condense, name="condense"))
            .assign(docs=RunnableLambda(self._retrieve, name="retrieve"))
            .assign(retrieved_at=RunnableLambda(lambda _: time.perf_counter(), name="clock"))
            .assign(docs=RunnableLambda(self._fit, name="fit_to_context"))
            .assign(messages=RunnableLambda(self._prompt, name="prompt"))
            .assign(answer=RunnableLambda(self._generate, name="generate"))
        )

    def _retrieve(self, x: dict[str, Any], config: RunnableConfig) -> list[Document]:
        if x.get("orphan"):  # leans on a question that found nothing: nothing to lean on
            return []
        opts = {k: x[k] for k in RETRIEVAL_KEYS if x.get(k) is not None}
        docs = self.retriever.invoke(x["query"], config, **opts)
        best = max((d.metadata.get("similarity") or -1.0 for d in docs), default=-1.0)
        if best < self.retriever.settings.answer_similarity:  # loosely related at best
            return []
        return docs

    @cached_property
    def chat_model(self) -> ChatModel:
        """The local LM's chat model, or a model server's (llm.provider)."""
        return self._chat_model()

    def _fit(self, x: dict[str, Any]) -> list[Document]:
        """Keep the best sources that fit: context length - answer budget - template."""
        if not x["docs"]:
            return []
        lm = self.chat_model.lm
        options = generation_options(self.generation, x.get("generation", {}))
        budget = lm.context_length - options.max_new_tokens
        return fit_sources(x["query"], x["docs"], lm.count_chat_tokens, budget)

    @staticmethod
    def _prompt(x: dict[str, Any]) -> list[dict[str, str]]:
        return build_messages(x["query"], x["docs"])

    def _generate(self, x: dict[str, Any], config: RunnableConfig) -> Iterator[AIMessageChunk]:
        if not x["docs"]:  # nothing relevant: say so without calling the model
            yield AIMessageChunk(content=NOT_FOUND, response_metadata={"not_found": True})
            return
        overrides = {k: v for k, v in x.get("generation", {}).items() if v is not None}
        options = generation_options(self.generation, overrides)
        if options.answer_mode == "grounded":
            texts = [d.page_content for d in x["docs"]]
            held = evidence(x["query"], texts) if options.min_evidence else None
            if held is not None and held < options.min_evidence:
                yield AIMessageChunk(content=NOT_FOUND, response_metadata={
                    "not_found": True, "refusal": NO_EVIDENCE})
                return
            focus = focus_sentences(x["query"], texts, options.focus_sentences) if (
                options.focus_sentences) else None
            extra = [NOT_FOUND] if options.model_refusal else []
            overrides["grounding"] = Grounding(texts, extra, question=x["query"],
                                               focus=focus)
        gate = self.chat_model.lm.gate
        ticket = gate.enter()
        entered = time.perf_counter()
        try:  # one generation at a time; the waiting ones report their place in the queue
            ahead = gate.wait(ticket, timeout=0)
            while ahead:
                yield AIMessageChunk(content="", response_metadata={QUEUE_KEY: str(ahead)})
                ahead = gate.wait(ticket, timeout=0.5)
            # Admitted: the time spent in the queue, measured at the gate itself.
            yield AIMessageChunk(content="", response_metadata={
                QUEUE_KEY: "0", QUEUE_MS_KEY: str((time.perf_counter() - entered) * 1000)})
            yield from self.chat_model.stream(
                [(m["role"].replace("user", "human"), m["content"]) for m in x["messages"]],
                config, **overrides,
            )
        finally:
            gate.leave(ticket)

    # -- convenience over the runnable ----------------------------------------------------
    def stream_events(self, question: str, history: Sequence[str | Turn] = (),
                      **options: Any) -> Iterator[list[Document] | Waiting | str | RagAnswer]:
        """Yield the sources (a list) once retrieved, `Waiting` events while other requests
        hold the model, then answer text pieces, then RagAnswer.

        `history`: the earlier turns (or their standalone queries) of this conversation,
        oldest first; a follow-up is rewritten into a standalone query with them before
        retrieval, and a follow-up of a question that found nothing finds nothing either.
        """
        started = time.perf_counter()
        turns = [t if isinstance(t, Turn) else Turn(t) for t in history]
        orphan = bool(turns) and not turns[-1].found and is_follow_up(question)
        inputs = {"question": question, "history": [t.query for t in turns], "orphan": orphan,
                  **_split_options(options)}
        options_now = generation_options(self.generation, inputs["generation"])  # fail early
        docs: list[Document] = []
        query = question
        pieces: list[str] = []
        message: AIMessageChunk | None = None
        retrieved_at = started
        queue_ms = 0.0
        for chunk in self.runnable.stream(inputs):
            query = chunk.get("query", query)
            # up to the end of retrieval; fitting may load the LLM, which is not retrieval
            retrieved_at = chunk.get("retrieved_at", retrieved_at)
            if "docs" in chunk:
                docs = chunk["docs"]
                yield docs
            if "answer" in chunk and QUEUE_KEY in chunk["answer"].response_metadata:
                queue = chunk["answer"].response_metadata
                if QUEUE_MS_KEY in queue:
                    queue_ms = float(queue[QUEUE_MS_KEY])
                else:
                    yield Waiting(int(queue[QUEUE_KEY]))
            elif "answer" in chunk:
                message = chunk["answer"] if message is None else message + chunk["answer"]
                if chunk["answer"].content:
                    pieces.append(chunk["answer"].text)
                    yield chunk["answer"].text
        meta = dict(message.response_metadata) if message else {}
        called = not meta.get("not_found")
        out = RagAnswer(
            question, query, "".join(pieces).strip(), docs, [], called,
            {**(model_metadata(self.chat_model.lm) if called else
                {"model_name": self.model_name}), **meta},
            {"retrieve_ms": (retrieved_at - started) * 1000, "queue_ms": queue_ms,
             "first_token_ms": meta.get("first_token_ms", 0.0),
             "generate_ms": meta.get("generate_ms", 0.0),
             "tokens_per_s": meta.get("tokens_per_s", 0.0),
             "total_ms": (time.perf_counter() - started) * 1000})
        if not called:
            out.refusal = FOLLOWS_NOT_FOUND if orphan else meta.get("refusal", NO_PASSAGE)
        elif options_now.answer_mode == "grounded":
            self._ground(out, options_now)
        else:
            out.cited = parse_citations(out.answer, len(docs))
            out.matched = self._match(out.answer, query, docs, out.cited)
            if NOT_FOUND.lower() in out.answer.lower():
                out.found, out.refusal = False, NO_ANSWER
        yield out

    @staticmethod
    def _ground(out: RagAnswer, options: GenerationSettings) -> None:
        """A grounded answer: locate the copied span and cite its source, or refuse when the
        model chose the "not found" reply, its span is too unlikely or its sentence is not
        about the question."""
        text = strip_end(out.answer)
        probs = [t["prob"] for t in out.metadata.get("tokens", [])
                 if t["text"].strip() not in ("[", "")]
        out.confidence = sum(probs) / len(probs) if probs else None
        span = locate_span(text, [d.page_content for d in out.sources])
        if text == NOT_FOUND or span is None:
            out.answer, out.found, out.refusal = NOT_FOUND, False, NO_ANSWER
            return
        if out.confidence is not None and out.confidence < options.min_span_prob:
            out.answer, out.found, out.refusal = NOT_FOUND, False, LOW_CONFIDENCE
            return
        source = out.sources[span.n - 1].page_content
        # "RRF" -> "reciprocal rank fusion (RRF)"
        span = with_expansion(span, source, out.question)
        if asks_two_things(out.question):
            span = to_sentence_end(span, source)
        held = support(span, source, out.query)
        if held is not None and held < options.min_support:
            out.answer, out.found, out.refusal = NOT_FOUND, False, UNSUPPORTED
            return
        out.spans, out.cited = [span], [span.n]
        out.answer = f"{' '.join(span.text.split())} [{span.n}]"

    def answer(self, question: str, history: Sequence[str | Turn] = (), **options: Any
               ) -> RagAnswer:
        *_, final = self.stream_events(question, history, **options)
        assert isinstance(final, RagAnswer)
        return final

    def _match(self, answer: str, query: str, docs: list[Document], cited: list[int]
               ) -> list[int]:
        if not self.citations.match_uncited or NOT_FOUND.lower() in answer.lower():
            return []
        return match_sources(answer, query, [d.page_content for d in docs], cited,
                             self.citations.min_overlap)

def _condense(x: dict[str, Any]) -> str:
    return condense_question(x["question"], x.get("history", []))


def _split_options(options: dict[str, Any]) -> dict[str, Any]:
    """Retrieval options stay top-level; the rest are decoding overrides."""
    out: dict[str, Any] = {k: options.pop(k) for k in RETRIEVAL_KEYS if k in options}
    out["generation"] = options
    return out
