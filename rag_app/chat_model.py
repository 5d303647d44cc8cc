"""LangChain `BaseChatModel` over the local causal LM: invoke / stream / batch (and async,
through LangChain's defaults), with per-call decoding overrides as keyword arguments."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, ValidationError

from rag_app.errors import SettingsError
from rag_app.llm import Generation, LocalLM
from rag_app.prompt import Message
from rag_app.settings import GenerationSettings, format_validation_error

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "user"}


def to_chat_messages(messages: list[BaseMessage]) -> list[Message]:
    return [{"role": _ROLES.get(m.type, "user"), "content": m.text} for m in messages]


def generation_options(base: GenerationSettings, overrides: dict[str, Any]) -> GenerationSettings:
    """Apply per-request overrides (None = keep) and validate, naming the bad field."""
    known = {k: v for k, v in overrides.items() if k in GenerationSettings.model_fields}
    try:
        return GenerationSettings.model_validate(
            {**base.model_dump(), **{k: v for k, v in known.items() if v is not None}})
    except ValidationError as e:
        raise SettingsError(format_validation_error(e, "generation")) from e


def model_metadata(lm: LocalLM) -> dict[str, Any]:
    """Which model answered, where, in what, decoded by whom."""
    return {"model_name": lm.name, "adapter": lm.adapter, "device": lm.device,
            "dtype": lm.dtype_name, "engine": lm.engine_name}


def generation_metadata(lm: LocalLM, gen: Generation) -> dict[str, Any]:
    return {
        **model_metadata(lm),
        "streamed": gen.streamed,
        "tokens": [{"text": t.text, "prob": t.prob, "top": t.top} for t in gen.tokens],
        "mean_logprob": gen.mean_logprob,
        "first_token_ms": gen.first_token_s * 1000, "generate_ms": gen.total_s * 1000,
        "tokens_per_s": gen.tokens_per_s,
    }


def _usage(gen: Generation) -> UsageMetadata:
    return UsageMetadata(input_tokens=gen.prompt_tokens, output_tokens=len(gen.tokens),
                         total_tokens=gen.prompt_tokens + len(gen.tokens))


class LocalChatModel(BaseChatModel):
    """A chat model backed by a local transformers causal LM (see `LocalLM`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    lm: LocalLM = Field(exclude=True)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    # LangChain's standard parameters, applied over `generation` (None = keep it)
    max_tokens: int | None = Field(None, ge=1, description="= generation.max_new_tokens.")
    temperature: float | None = Field(
        None, ge=0.0, description="0 = greedy; > 0 = sample at this temperature.")
    stop: list[str] | None = Field(None, description="Default stop sequences.")
    streaming: bool = Field(False, description="invoke() streams internally (callbacks).")

    @property
    def _llm_type(self) -> str:
        return "rag-app-local-transformers"

    @property
    def model_name(self) -> str:
        return self.lm.name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.lm.name, **self._options({}).model_dump()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        options = self._options(kwargs)
        params = LangSmithParams(
            ls_provider="huggingface", ls_model_type="chat",
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str)
            else self.lm.name,
            ls_temperature=options.temperature if options.do_sample else 0.0,
            ls_max_tokens=options.max_new_tokens)
        if stops := self._stops(stop):
            params["ls_stop"] = stops
        return params

    def _options(self, kwargs: dict[str, Any]) -> GenerationSettings:
        """`generation`, then the standard parameters, then per-call overrides."""
        overrides: dict[str, Any] = {}
        for source in (self.model_dump(include={"max_tokens", "temperature"}), kwargs):
            overrides.update({k: v for k, v in source.items() if v is not None})
            if source.get("max_tokens") is not None:
                overrides["max_new_tokens"] = source["max_tokens"]
            if (t := source.get("temperature")) is not None and "do_sample" not in source:
                overrides["do_sample"] = t > 0
                if t == 0:
                    del overrides["temperature"]
        return generation_options(self.generation, overrides)

    def _stops(self, stop: list[str] | None) -> list[str] | None:
        stops = [*(self.stop or []), *(stop or [])]
        return list(dict.fromkeys(s for s in stops if s)) or None

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        grounding = kwargs.pop("grounding", None)  # rag_app.grounded.Grounding, from the chain
        options = self._options(kwargs)
        for item in self.lm.stream(to_chat_messages(messages), options, self._stops(stop),
                                   grounding):
            if isinstance(item, Generation):
                chunk = AIMessageChunk(content="", usage_metadata=_usage(item),
                                       response_metadata=generation_metadata(self.lm, item),
                                       chunk_position="last")
                yield ChatGenerationChunk(message=chunk)
            elif item:
                if run_manager:
                    run_manager.on_llm_new_token(item)
                yield ChatGenerationChunk(message=AIMessageChunk(content=item))

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        options = self._options(kwargs)
        gen = self.lm.generate(to_chat_messages(messages), options, self._stops(stop))
        message = AIMessage(content=gen.text, usage_metadata=_usage(gen),
                            response_metadata=generation_metadata(self.lm, gen))
        return ChatResult(generations=[ChatGeneration(message=message)])
