"""LangChain `BaseChatModel` over the local causal LM: invoke / stream / batch (and async,
through LangChain's defaults), with per-call decoding overrides as keyword arguments."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, ValidationError

from rag_app.errors import SettingsError
from rag_app.llm import Generation, LocalLM, Message
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
        raise SettingsError(format_validation_error(e).replace("setting ", "setting generation.")
                            ) from e


def generation_metadata(lm: LocalLM, gen: Generation) -> dict[str, Any]:
    return {
        "model_name": lm.name, "device": lm.device, "dtype": str(lm.dtype).removeprefix("torch."),
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

    @property
    def _llm_type(self) -> str:
        return "rag-app-local-transformers"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.lm.name, **self.generation.model_dump()}

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options = generation_options(self.generation, kwargs)
        for item in self.lm.stream(to_chat_messages(messages), options, stop):
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
        options = generation_options(self.generation, kwargs)
        gen = self.lm.generate(to_chat_messages(messages), options, stop)
        message = AIMessage(content=gen.text, usage_metadata=_usage(gen),
                            response_metadata=generation_metadata(self.lm, gen))
        return ChatResult(generations=[ChatGeneration(message=message)])
