"""Device and dtype resolved once, from settings."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """auto = CUDA, then Apple MPS, then CPU."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto = bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU.

    float32 on CPU although bf16 measured faster here (benchmarks/generation.py: first token
    about 2.7x sooner): in bf16, greedy answers change with the KV-cache path and reported
    token probabilities drift by several points, and this project promises reproducible
    greedy answers and exact probabilities. `llm.dtype=bfloat16` opts into the speed.
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32
