"""The generator on a model server (llm.provider = openai): any OpenAI-compatible
`/v1/chat/completions` (Ollama, vLLM, llama.cpp's server, `rag serve`'s bare model), called
through LangChain's own integration, langchain-openai's `ChatOpenAI` with a base URL.

`RemoteChatModel` takes the same per-call decoding options as `LocalChatModel` (the
`generation.*` names) and the same place in the chain: it maps those the OpenAI API carries
(temperature, top_p, seed, max_new_tokens) onto the request and refuses the others by name
(`rag_app.settings.remote_decoding_problem`). `RemoteLM` stands where the chain reads the
local model: its name, its context window, a token estimate for fitting the sources, and a
gate that queues nothing (the server schedules concurrent requests itself).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_openai import ChatOpenAI
from pydantic import ConfigDict, Field

from rag_app.chat_model import generation_options
from rag_app.errors import ModelServerError, SettingsError
from rag_app.gate import OpenGate
from rag_app.prompt import Message
from rag_app.settings import (
    REMOTE_CONTEXT,
    GenerationSettings,
    LLMSettings,
    remote_decoding_problem,
)

log = logging.getLogger(__name__)
# A token estimate without the server's tokenizer: English BPE averages about 4 characters
# a token; 3 leaves room for code, numbers and other languages (too many sources dropped,
# rather than a prompt the server truncates). Plus the chat template's tokens per message.
CHARS_PER_TOKEN = 3
TEMPLATE_TOKENS = 8


def public_url(url: str) -> str:
    """`url` without user:password@ (what may be shown and logged)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def estimate_tokens(messages: Sequence[Message]) -> int:
    """An upper estimate of the chat's prompt tokens on a server whose tokenizer is unknown."""
    chars = sum(len(m["content"]) for m in messages)
    return -(-chars // CHARS_PER_TOKEN) + TEMPLATE_TOKENS * (len(messages) + 1)


class RemoteLM:
    """The served model as the chain sees a generator (`LocalLM`'s reported attributes)."""

    def __init__(self, settings: LLMSettings) -> None:
        assert settings.base_url is not None  # LLMSettings requires it for provider openai
        self.name = settings.model
        self.adapter: str | None = None
        self.url = public_url(settings.base_url)
        self.device = "server"
        self.dtype_name: str | None = None  # the server's business
        self.engine_name = f"OpenAI-compatible server at {self.url}"
        self.context_length = settings.context_length or REMOTE_CONTEXT
        self.gate = OpenGate()

    @staticmethod
    def count_chat_tokens(messages: Sequence[Message]) -> int:
        return estimate_tokens(messages)


def request_options(options: GenerationSettings) -> dict[str, Any]:
    """The OpenAI request fields for `options` (greedy = temperature 0; top_p only when
    sampling, where it means something). The answer's length goes as `max_tokens`, the
    field every OpenAI-compatible server reads: ChatOpenAI would rename it to the newer
    `max_completion_tokens`, which llama-cpp-python's server (0.3) silently ignores."""
    out: dict[str, Any] = {"extra_body": {"max_tokens": options.max_new_tokens},
                           "temperature": options.temperature if options.do_sample else 0.0}
    if options.do_sample and options.top_p < 1.0:
        out["top_p"] = options.top_p
    if options.seed is not None:
        out["seed"] = options.seed
    return out


def build_client(settings: LLMSettings) -> ChatOpenAI:
    """LangChain's ChatOpenAI on llm.base_url: the key given explicitly (OPENAI_API_KEY is
    never read; a placeholder when none is set), no usage stream (not every server has it)."""
    key = settings.api_key.get_secret_value() if settings.api_key else "no-key"
    return ChatOpenAI(model=settings.model, base_url=settings.base_url, api_key=key,
                      timeout=settings.timeout_s, max_retries=settings.max_retries,
                      stream_usage=False)


class RemoteChatModel(BaseChatModel):
    """A chat model answered by an OpenAI-compatible server (see the module docstring)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    lm: RemoteLM = Field(exclude=True)
    client: ChatOpenAI = Field(exclude=True)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)

    def __repr_args__(self) -> Any:  # the client holds the key: never in a repr
        return [("model_name", self.lm.name), ("url", self.lm.url)]

    @property
    def _llm_type(self) -> str:
        return "rag-app-openai-compatible-server"

    @property
    def model_name(self) -> str:
        return self.lm.name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.lm.name, "url": self.lm.url}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        options = self._options(dict(kwargs))
        return LangSmithParams(ls_provider="openai", ls_model_type="chat",
                               ls_model_name=self.lm.name,
                               ls_temperature=options.temperature if options.do_sample else 0.0,
                               ls_max_tokens=options.max_new_tokens)

    def _options(self, kwargs: dict[str, Any]) -> GenerationSettings:
        """`generation` with the per-call overrides, refused by name if the server cannot
        honour them (grounded answers included: they need the local model's logits)."""
        if kwargs.pop("grounding", None) is not None:
            kwargs["answer_mode"] = "grounded"
        given = {k for k, v in kwargs.items() if v is not None}
        options = generation_options(self.generation, kwargs)
        problem = remote_decoding_problem(options, self.generation.model_fields_set | given)
        if problem:
            raise SettingsError(problem)
        return options

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        params = request_options(self._options(kwargs))
        started = time.perf_counter()
        first: float | None = None
        pieces = 0
        finish: str | None = None
        try:
            for chunk in self.client.stream(messages, stop=stop, **params):
                finish = chunk.response_metadata.get("finish_reason") or finish
                if not chunk.text:
                    continue
                if first is None:
                    first = time.perf_counter() - started
                pieces += 1
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text)
                yield ChatGenerationChunk(message=AIMessageChunk(content=chunk.text))
        except openai.APIError as e:
            raise self._error(e) from e
        total = time.perf_counter() - started
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", chunk_position="last",
            usage_metadata=UsageMetadata(input_tokens=0, output_tokens=pieces,
                                         total_tokens=pieces),
            response_metadata=self._metadata(first, total, pieces, finish)))

    def _metadata(self, first: float | None, total: float, pieces: int,
                  finish: str | None) -> dict[str, Any]:
        first = first if first is not None else total
        decode = total - first
        return {"model_name": self.lm.name, "adapter": None, "device": self.lm.device,
                "dtype": None, "engine": self.lm.engine_name, "streamed": True,
                "tokens": [], "mean_logprob": None, "finish_reason": finish,
                "first_token_ms": first * 1000, "generate_ms": total * 1000,
                # pieces, as the server streams them: about one token each
                "tokens_per_s": (pieces - 1) / decode if pieces > 1 and decode > 0 else 0.0}

    def _error(self, e: openai.APIError) -> Exception:
        where = f"the model server at llm.base_url = {self.lm.url}"
        if isinstance(e, openai.APIConnectionError):  # refused, unreachable, timed out
            return ModelServerError(f"{where} cannot be reached ({e}); is it running? "
                                    "(llm.timeout_s bounds the wait)")
        status = getattr(e, "status_code", None)
        detail = _message(e)
        if status in (401, 403):
            return ModelServerError(f"{where} refused the key ({detail}): set llm.api_key "
                                    "(RAG_LLM__API_KEY) to the server's key")
        if status == 404:
            return ModelServerError(f"{where} answered 404 ({detail}): check llm.base_url "
                                    f"(the API root, up to /v1) and llm.model = {self.lm.name!r}")
        if status is not None and 400 <= status < 500:
            return SettingsError(f"{where} refused the request ({status}: {detail})")
        return ModelServerError(f"{where} failed ({status or 'no status'}: {detail})")

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))


def _message(e: openai.APIError) -> str:
    """The server's own error message, else the client's."""
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return e.message
