"""`rag serve`'s generator without retrieval: model `llm` on /v1/chat/completions is the
app's chat model answering the messages as given (system, user and assistant turns kept),
as any OpenAI-compatible model server does. It lets another program, or another rag_app
with llm.provider = openai, use this process's model; it takes turns at the model's gate
with the answers from the documents."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk

from rag_app.errors import RagError, SettingsError
from rag_app.gate import FairGate
from rag_app.openai_compat import ChatRequest, Reply
from rag_app.pump import Pump

log = logging.getLogger(__name__)
BARE_MODEL = "llm"
RETRIEVAL_FIELDS = ("collection", "k", "mode", "source", "page", "mmr", "rerank")
_ROLES = {"system": "system", "user": "human", "assistant": "ai"}


def bare_messages(body: ChatRequest) -> list[tuple[str, str]]:
    """The request's messages for the chat model; retrieval options are refused (this model
    reads no documents)."""
    for name in RETRIEVAL_FIELDS:
        if getattr(body, name) is not None:
            raise SettingsError(f"{name}: model {BARE_MODEL!r} answers without retrieval "
                                "(use model 'rag' or 'rag:COLLECTION' to ask your documents)")
    out = []
    for m in body.messages:
        if m.role not in _ROLES:
            raise SettingsError(f"messages: role {m.role!r} is not supported (system, user, "
                                "assistant)")
        out.append((_ROLES[m.role], m.text()))
    return out


def bare_options(body: ChatRequest) -> dict[str, Any]:
    """The request's decoding options (generation.* names)."""
    return {k: v for k, v in body.options().items() if k not in RETRIEVAL_FIELDS}


def generate(model: BaseChatModel, gate: FairGate, messages: list[tuple[str, str]],
             options: dict[str, Any]) -> Iterator[str | AIMessageChunk]:
    """Text pieces, then the whole message (with its usage), in the model's turn."""
    with gate.hold():
        message: AIMessageChunk | None = None
        for chunk in model.stream(messages, **options):
            assert isinstance(chunk, AIMessageChunk)
            message = chunk if message is None else message + chunk
            if chunk.text:
                yield chunk.text
        yield message if message is not None else AIMessageChunk(content="")


def _finish(message: AIMessageChunk, max_new: int) -> str:
    given = message.response_metadata.get("finish_reason")
    if given in ("stop", "length"):
        return given
    usage = message.usage_metadata or {}
    return "length" if usage.get("output_tokens", 0) >= max_new else "stop"


def _usage(message: AIMessageChunk) -> dict[str, int]:
    usage = message.usage_metadata or {}
    return {"prompt_tokens": usage.get("input_tokens", 0),
            "completion_tokens": usage.get("output_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0)}


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def bare_completion(body: ChatRequest, model: BaseChatModel, gate: FairGate,
                          max_new: int) -> JSONResponse | StreamingResponse:
    """The completion of `body.messages` by `model` (streamed when `body.stream`)."""
    messages, options = bare_messages(body), bare_options(body)
    events = Pump(lambda: generate(model, gate, messages, options))
    reply = Reply(body.model)
    if body.stream:
        return StreamingResponse(sse_stream(_chunks(events, reply, max_new), events),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    pieces: list[str] = []
    try:
        async for event in events:
            if isinstance(event, str):
                pieces.append(event)
            else:
                return JSONResponse({
                    "id": reply.id, "object": "chat.completion", "created": reply.created,
                    "model": reply.model, "usage": _usage(event),
                    "choices": [{"index": 0, "logprobs": None,
                                 "finish_reason": _finish(event, max_new),
                                 "message": {"role": "assistant",
                                             "content": "".join(pieces)}}]})
        raise RuntimeError("the model ended without a message")
    finally:
        events.cancel()


async def _chunks(events: Pump, reply: Reply, max_new: int) -> AsyncIterator[bytes]:
    yield sse(reply.chunk({"role": "assistant", "content": ""}))
    async for event in events:
        if isinstance(event, str):
            yield sse(reply.chunk({"content": event}))
        else:
            yield sse(reply.chunk({}, _finish(event, max_new), usage=_usage(event)))


async def sse_stream(body: AsyncIterator[bytes], events: Pump) -> AsyncIterator[bytes]:
    """`body`'s server-sent events, then [DONE]. After the first byte the status is sent,
    so an error is an error event (an unexpected one logged, its details kept in the log);
    whatever ends the stream, the generation thread may stop."""
    try:
        async for chunk in body:
            yield chunk
        yield b"data: [DONE]\n\n"
    except RagError as e:
        yield sse({"error": {"message": str(e), "type": "server_error"}})
    except Exception as e:
        log.error("internal error while streaming", exc_info=e)
        yield sse({"error": {"message": "internal error (the details are in the server's "
                                        "log)", "type": "server_error"}})
    finally:
        events.cancel()
