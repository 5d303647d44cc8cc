"""`rag serve`: the app over HTTP. An OpenAI-compatible chat endpoint answering from your
documents (sources beside the message), search, and documents upload / list / delete.

One `Services` per process: the models load once, on first need, and every request shares
them; generations take turns at the model's gate, each in its own thread, so the event
loop stays free. Loopback by default; with `serve.token` every route but /health needs
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from rag_app.bare import BARE_MODEL, bare_completion, sse_stream
from rag_app.bare import sse as _sse
from rag_app.chain import RagAnswer, Waiting, source_json
from rag_app.chat_model import generation_options
from rag_app.errors import EmptyIndexError, RagError, SettingsError, StoreBusyError
from rag_app.factory import Services
from rag_app.hosts import names_this_machine
from rag_app.openai_compat import (
    COLLECTION,
    MODEL,
    ChatRequest,
    Reply,
    conversation,
    finish_reason,
    tail,
)
from rag_app.pump import Pump
from rag_app.settings import ServeSettings, Settings

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health",)  # answered without the token (no data behind them)


# -- errors: {"error": {"message", "type"}}, never a traceback ------------------------------
def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            409: "conflict_error"}.get(status, "invalid_request_error" if status < 500
                                       else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind}}, status, headers)


def status_of(e: RagError) -> int:
    if isinstance(e, SettingsError):
        return 400
    if isinstance(e, EmptyIndexError):
        return 404
    return 409 if isinstance(e, StoreBusyError) else 503  # the server cannot serve it now


async def _rag_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RagError)
    return error_response(status_of(e), str(e))


async def _http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, HTTPException)
    return error_response(e.status_code, str(e.detail), e.headers)


async def _invalid_request(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    def one(err: dict[str, Any]) -> str:
        if err["type"] == "json_invalid":
            return "the body is not valid JSON"
        return ".".join(str(p) for p in err["loc"] if p != "body") + f": {err['msg']}"
    return error_response(400, "invalid request: " + "; ".join(map(one, e.errors())))


async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    log.error("internal error", exc_info=e)  # the traceback goes to the log only
    return error_response(500, "internal error (the details are in the server's log)")


class Guard:
    """Before every route but OPEN_PATHS: with a token, `Authorization: Bearer <token>`
    (compared in constant time); without one, a Host and Origin naming this machine, so a
    web page elsewhere that points its own name at 127.0.0.1 reads nothing."""

    def __init__(self, app: ASGIApp, serve: ServeSettings) -> None:
        self.app = app
        self.serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            refusal = self.refusal(Headers(scope=scope))
            if refusal is not None:
                client = scope.get("client") or ("?", 0)
                log.warning("refused %s %s from %s (%d)", scope["method"], scope["path"],
                            client[0], refusal.status_code)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers) -> JSONResponse | None:
        if self.serve.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            expected = self.serve.token.get_secret_value().encode()
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  expected):
                return None
            return error_response(401, "missing or wrong bearer token (Authorization: Bearer "
                                  "<serve.token>)", {"WWW-Authenticate": "Bearer"})
        for key in ("host", "origin"):
            value = headers.get(key)
            if value is not None and not names_this_machine(value, self.serve.host):
                return error_response(403, "this API answers only at its own address (for "
                                      f"example http://localhost:{self.serve.port})")
        return None


# -- the app -------------------------------------------------------------------------------
def create_app(services: Services) -> FastAPI:
    """The API over one `Services` (its models are loaded on first need, once)."""
    app = FastAPI(title="rag_app", version="0.1.0", summary="Ask your documents, answered by "
                  "a local GPT, with sources. OpenAI-compatible chat completions.")
    app.state.services = services
    app.state.loading = threading.Lock()  # a model is built once, even by concurrent requests
    app.add_exception_handler(RagError, _rag_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(Guard, serve=services.settings.serve)
    app.include_router(router)
    return app


def _ready(request: Request, *parts: str) -> Services:
    """The app's Services with `parts` built (blocking: call it in a thread)."""
    services: Services = request.app.state.services
    with request.app.state.loading:
        for part in parts:
            getattr(services, part)
    return services


CollectionQuery = Annotated[str | None, Query(pattern=COLLECTION,
                                              description="Default: setting collection.")]
router = APIRouter()


@router.get("/health", tags=["meta"])
def health() -> dict[str, str]:
    """Always open (no token needed): the server is up. Loads nothing."""
    return {"status": "ok"}


@router.get("/v1/models", tags=["openai"])
def models(request: Request) -> dict[str, Any]:
    """`rag` answers from the default collection; `rag:NAME` from collection NAME; `llm` is
    the model that writes the answers, without retrieval."""
    services = _ready(request, "store")
    default = services.settings.collection
    names = [MODEL] + [f"{MODEL}:{c}" for c in services.store.collections() if c != default]
    names.append(BARE_MODEL)
    return {"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "rag_app",
         "llm": services.settings.llm.model} for n in names]}


@router.post("/v1/chat/completions", tags=["openai"], response_model=None)
async def chat_completions(body: ChatRequest, request: Request
                           ) -> JSONResponse | StreamingResponse:
    """The last user message answered from the documents; `stream: true` sends server-sent
    events in OpenAI's chunk format, ending with `data: [DONE]`. Beside the message:
    `sources` (the numbered passages) and `rag` (the answer as `rag ask --json` prints
    it). Unsupported OpenAI fields (n > 1, tools, logprobs, ...) are refused with 400.
    Model `llm`: the messages answered by the model alone, without retrieval."""
    services: Services = request.app.state.services
    body.refuse_unsupported()
    options = body.options()
    max_new = generation_options(services.settings.generation, options).max_new_tokens
    if body.model == BARE_MODEL:
        await run_in_threadpool(_ready, request, "chat_model")
        model = services.chat_model
        return await bare_completion(body, model, model.lm.gate, max_new)
    question, history = conversation(body.messages)
    await run_in_threadpool(_ready, request, "store", "chat_model")
    chain = services.chain(body.collection_name())
    events = Pump(lambda: chain.stream_events(question, history, **options))
    reply = Reply(body.model)
    streaming = False
    try:
        first = await events.next()  # the sources; an error before them is the request's
        if not body.stream:
            async for event in events:
                if isinstance(event, RagAnswer):
                    return JSONResponse(reply.completion(event, max_new))
            raise RuntimeError("the chain ended without an answer")
        streaming = True
    finally:
        if not streaming:  # answered, failed, or the client left: the thread may stop
            events.cancel()
    return StreamingResponse(sse_stream(_chunks(events, first, reply, max_new), events),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chunks(events: Pump, first: Any, reply: Reply, max_new: int
                  ) -> AsyncIterator[bytes]:
    """The answer as OpenAI chunks: the role (with the sources), text pieces, the rest of the
    answer with its finish reason (and `rag`); sse_stream adds [DONE]. Waiting is an SSE
    comment."""
    docs = [source_json(n, d) for n, d in enumerate(first, 1)] if isinstance(first, list) else []
    yield _sse(reply.chunk({"role": "assistant", "content": ""}, sources=docs))
    streamed: list[str] = []
    async for event in events:
        if isinstance(event, Waiting):
            yield f": waiting for the model, {event.ahead} request(s) ahead\n\n".encode()
        elif isinstance(event, str):
            streamed.append(event)
            yield _sse(reply.chunk({"content": event}))
        elif isinstance(event, RagAnswer):
            rest = tail("".join(streamed), event.answer)
            out = event.to_json()
            yield _sse(reply.chunk({"content": rest} if rest else {},
                                   finish_reason(event, max_new),
                                   sources=out["sources"], rag=out))


# -- search and documents ------------------------------------------------------------------
class SearchRequest(BaseModel):
    query: str = Field(min_length=1)
    k: int | None = Field(None, ge=1, le=50)
    mode: str | None = Field(None, pattern="^(vector|fulltext|hybrid)$")
    collection: str | None = Field(None, pattern=COLLECTION)
    source: str | None = None
    page: int | None = None
    mmr: bool | None = None
    rerank: bool | None = None


@router.post("/v1/search", tags=["rag"])
def search(body: SearchRequest, request: Request) -> dict[str, Any]:
    """The retrieved passages with their scores, as `rag search --json` prints them (no
    generation)."""
    services = _ready(request, "store")
    docs = services.retriever(body.collection).invoke(
        body.query, k=body.k, mode=body.mode, source=body.source, page=body.page,
        mmr=body.mmr, rerank=body.rerank)
    return {"query": body.query, "hits": [source_json(n, d) for n, d in enumerate(docs, 1)]}


@router.get("/v1/documents", tags=["rag"])
def list_documents(request: Request, collection: CollectionQuery = None) -> dict[str, Any]:
    """The documents of a collection with their chunk counts (`rag docs --json`)."""
    services = _ready(request, "store")
    name = collection or services.settings.collection
    return {"collection": name, "documents": services.store.documents(name)}


@router.post("/v1/documents", tags=["rag"])
def upload_documents(
    request: Request,
    files: Annotated[list[UploadFile], File(description="txt, md, pdf, html, docx, csv, or "
                                                        "a zip of these")],
    collection: Annotated[str | None, Form(pattern=COLLECTION)] = None,
    replace: Annotated[bool, Form(description="store over a different document of the same "
                                              "name (otherwise it is reported)")] = False,
) -> dict[str, Any]:
    """Ingest uploaded files (as the UI's upload does: sources `upload/NAME`, files above
    ui.max_upload_mb refused, a name already taken by a different document reported unless
    `replace`); the reply is the per-file report of `rag ingest --json`."""
    from ingest.pipeline import uploaded

    services = _ready(request, "store")
    limit = services.settings.ui.max_upload_mb
    items = [uploaded(f.filename or "", _size(f), f.file.read, limit) for f in files]
    report = services.ingestor().ingest(items, collection or services.settings.collection,
                                        replace=replace)
    return report.to_json()


def _size(upload: UploadFile) -> int:
    if upload.size is not None:
        return upload.size
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    return size


@router.delete("/v1/documents/{source:path}", tags=["rag"])
def delete_document(source: str, request: Request, collection: CollectionQuery = None
                    ) -> dict[str, Any]:
    """Remove a document (all its chunks); 404 when the collection has no such document."""
    services = _ready(request, "store")
    name = collection or services.settings.collection
    n = services.store.delete_documents(name, [source])
    if n == 0:
        raise HTTPException(404, f"no document {source!r} in collection {name!r}")
    return {"source": source, "collection": name, "deleted_chunks": n}


def run(settings: Settings) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM)."""
    import uvicorn

    serve = settings.serve
    log.warning("rag serve on http://%s:%d (API docs at /docs); %s", serve.host, serve.port,
                "bearer token required" if serve.token else "no token: loopback only")
    config = uvicorn.Config(create_app(Services(settings)), host=serve.host, port=serve.port,
                            workers=1, log_level="info", server_header=False)
    uvicorn.Server(config).run()
