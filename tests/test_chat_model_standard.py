"""LangChain's standard chat-model test suite (`langchain-tests`) run against
`LocalChatModel` over the session's real SmolLM2.

The suite builds its model as `chat_model_class(**chat_model_params)`, so the session's
loaded `LocalLM` is handed over through a module-level holder filled by an autouse fixture:
the model is loaded once per session, whichever test runs first.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from rag_app.chat_model import LocalChatModel
from rag_app.llm import LocalLM
from rag_app.settings import GenerationSettings

pytestmark = pytest.mark.slow

_LM: dict[str, LocalLM] = {}


@pytest.fixture(autouse=True)
def _session_lm(services) -> None:
    _LM.setdefault("lm", services.lm)


class _LocalModelProperties:
    """What a local text-only causal LM without tools can do."""

    @property
    def chat_model_class(self) -> type[LocalChatModel]:
        return LocalChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # short answers keep the suite fast on a CPU
        return {"lm": _LM["lm"], "generation": GenerationSettings(max_new_tokens=16)}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        # one loaded model: a per-call `model=` cannot switch weights
        return False

    @property
    def enable_vcr_tests(self) -> bool:
        return False  # no HTTP to record


class TestLocalChatModelUnit(_LocalModelProperties, ChatModelUnitTests):
    pass


class TestLocalChatModelIntegration(_LocalModelProperties, ChatModelIntegrationTests):
    pass
