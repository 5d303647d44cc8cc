"""llm.adapter: a peft LoRA adapter merged into the loaded model's weights.

Merged, not wrapped: every engine then reads plain weights, and the fast CPU decoder
quantizes the merged ones itself (merge, then quantize).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rag_app.errors import ModelLoadError
from rag_app.locate import resolve_model_ref
from rag_app.settings import LLMSettings

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def apply_adapter(model: Any, settings: LLMSettings) -> Any:
    """`model` with llm.adapter merged in (`model` itself when there is none)."""
    ref = settings.adapter_ref()
    if ref is None:
        return model
    folder = adapter_folder(ref)
    weights = _read_weights(folder, ref)
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (ValueError, RuntimeError, KeyError) as e:
        raise _mismatch(settings, e) from e
    expected = set(get_peft_model_state_dict(peft_model))
    if expected != set(weights):
        missing = len(expected - set(weights))
        raise _mismatch(settings, f"{missing} of its LoRA weights are missing")
    log.info("merging LoRA adapter %s into %s", folder, settings.model)
    return peft_model.merge_and_unload()


def adapter_folder(ref: str) -> Path:
    """The folder llm.adapter names; a one-line error when it is not a peft adapter."""
    folder = Path(resolve_model_ref(ref, "llm.adapter"))
    if not folder.is_dir():
        raise ModelLoadError(f"llm.adapter={ref!r}: no such folder; set llm.adapter "
                             "(RAG_LLM__ADAPTER) to a folder written by `rag tune`, or unset it")
    config = folder / CONFIG
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"llm.adapter={ref!r}: {folder} is not a peft adapter (no "
                             f"readable {CONFIG}); set llm.adapter to a `rag tune` output "
                             "folder") from e
    if kind != "LORA":
        raise ModelLoadError(f"llm.adapter={ref!r}: {config} is a {kind} adapter, not LoRA")
    return folder


def _read_weights(folder: Path, ref: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"llm.adapter={ref!r}: cannot read {path} ({e}); train it again "
                             "with `rag tune` or unset llm.adapter") from e


def _mismatch(settings: LLMSettings, why: object) -> ModelLoadError:
    first = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
    return ModelLoadError(
        f"llm.adapter={settings.adapter!r} does not fit llm.model={settings.model!r} "
        f"({first[:200]}); use an adapter trained for this model, or unset llm.adapter")
