"""OpenAI's chat-completions format over the retrieval chain: a request becomes the chain's
question, conversation and options; an answer becomes a ChatCompletion (or its stream of
chunks) with the sources beside the message, in fields OpenAI clients ignore."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rag_app.chain import RagAnswer, Turn
from rag_app.errors import SettingsError
from rag_app.prompt import NOT_FOUND, condense_question

COLLECTION = r"^[A-Za-z0-9_-]+$"  # as Settings.collection accepts
MODEL = "rag"  # the default collection; "rag:NAME" is collection NAME
# OpenAI fields this server cannot honour, with the values that mean "not used"
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "stop": (None, [], ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "logit_bias": (None, {}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "audio": (None,), "prediction": (None,),
    "modalities": (None, ["text"]), "response_format": (None, {"type": "text"}),
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {part.get("type") for part in self.content} - {"text"}
        if kinds:
            raise SettingsError(f"messages: content parts of type {sorted(map(str, kinds))} "
                                "are not supported (text only)")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(BaseModel):
    """OpenAI's chat-completions request (the fields that map to this app), plus the
    app's retrieval options. The last user message is the question, the earlier ones its
    conversation; system and assistant messages are not given to the model (the app
    writes its own prompt around the retrieved passages)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(MODEL, description="Echoed back. `rag:NAME` answers from collection "
                       "NAME; any other name, from the default collection.")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=5.0, description="0 = greedy; > 0 = "
                                      "sample at this temperature. Absent: generation.*.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_tokens: int | None = Field(None, ge=1, le=8192, description="Answer tokens at most.")
    max_completion_tokens: int | None = Field(None, ge=1, le=8192, description="= max_tokens.")
    seed: int | None = Field(None, description="Random seed for sampling.")
    # this app's own options (with the openai client: extra_body={...})
    collection: str | None = Field(None, pattern=COLLECTION, description="Overrides `model`.")
    k: int | None = Field(None, ge=1, le=50, description="Passages retrieved.")
    mode: Literal["vector", "fulltext", "hybrid"] | None = None
    source: str | None = Field(None, description="Only passages of this document.")
    page: int | None = Field(None, description="Only passages of this page.")
    mmr: bool | None = Field(None, description="Diversify passages (maximal marginal relevance).")
    rerank: bool | None = Field(None, description="Rescore with retrieval.rerank_model.")
    top_k: int | None = Field(None, ge=0, description="Sampling: the k likeliest tokens only.")
    num_beams: int | None = Field(None, ge=1, le=16, description="Beam search width.")

    def refuse_unsupported(self) -> None:
        """A field this server cannot honour is refused, naming it, never silently dropped."""
        given = {**(self.model_extra or {})}
        for name, off in UNSUPPORTED.items():
            if name in given and given[name] not in off:
                raise SettingsError(f"{name} = {given[name]!r} is not supported by this "
                                    f"server (supported: temperature, top_p, max_tokens, "
                                    f"seed, stream)")

    def collection_name(self) -> str | None:
        if self.collection:
            return self.collection
        if self.model.startswith(f"{MODEL}:") and len(self.model) > len(MODEL) + 1:
            return self.model[len(MODEL) + 1:]
        return None

    def options(self) -> dict[str, Any]:
        """The chain's retrieval and decoding options (None = the settings' value)."""
        out: dict[str, Any] = {
            "k": self.k, "mode": self.mode, "source": self.source, "page": self.page,
            "mmr": self.mmr, "rerank": self.rerank, "top_p": self.top_p, "seed": self.seed,
            "top_k": self.top_k, "num_beams": self.num_beams,
            "max_new_tokens": self.max_completion_tokens or self.max_tokens}
        if self.temperature is not None:  # as LocalChatModel reads `temperature`
            out["do_sample"] = self.temperature > 0
            out["temperature"] = self.temperature if self.temperature > 0 else None
        return {k: v for k, v in out.items() if v is not None}


def conversation(messages: list[ChatMessage]) -> tuple[str, list[Turn]]:
    """The question (the last user message) and the earlier turns, each with the standalone
    query the app searched for it and whether it was answered (its reply was not "not
    found"), as the UI keeps them."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    question = messages[last].text() if last is not None else ""
    if not question.strip():
        raise SettingsError("messages: the last user message (the question) is missing or "
                            "empty")
    turns: list[Turn] = []

    def turn(asked: str, found: bool) -> Turn:
        return Turn(condense_question(asked, [t.query for t in turns]), found)

    asked: str | None = None
    for m in messages[:last]:
        if m.role == "user":
            if asked is not None:
                turns.append(turn(asked, True))
            asked = m.text()
        elif m.role == "assistant" and asked is not None:
            turns.append(turn(asked, not m.text().strip().startswith(NOT_FOUND)))
            asked = None
    if asked is not None:
        turns.append(turn(asked, True))
    return question, turns


class Reply:
    """The id, time and model of one completion, shared by all its chunks."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def completion(self, answer: RagAnswer, max_new_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "logprobs": None,
                             "finish_reason": finish_reason(answer, max_new_tokens),
                             "message": {"role": "assistant", "content": answer.answer}}],
                **extras(answer)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}], **extra}


def extras(answer: RagAnswer) -> dict[str, Any]:
    """What OpenAI's format has no field for: the sources, and the whole answer as `rag ask
    --json` prints it (citations, timings, token probabilities)."""
    out = answer.to_json()
    return {"sources": out["sources"], "rag": out}


def finish_reason(answer: RagAnswer, max_new_tokens: int) -> str:
    given = answer.metadata.get("finish_reason")  # a model server's own
    if given in ("stop", "length"):
        return given
    return "length" if len(answer.metadata.get("tokens", [])) >= max_new_tokens else "stop"


def tail(streamed: str, answer: str) -> str:
    """The text that completes the streamed pieces into the final answer: the citation a
    grounded answer gains (" [2]"), or the reply that replaced a refused copy."""
    shown = streamed.strip()
    if answer == shown:
        return ""
    if shown and answer.startswith(shown):
        return answer[len(shown):]
    return f"\n-> {answer}" if shown else answer
